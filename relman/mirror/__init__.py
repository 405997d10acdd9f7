"""The HTTP mirror: repository paths and the JSON API over aiohttp."""
