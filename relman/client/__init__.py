"""The update engine on a node: pull with resume, staging, the atomic flip, rollback."""
