"""Exceptions raised by relman, in one tree.

    RelmanError                  exit code 1
    ├── InputError               bad value from the user (path, version, option)
    ├── ConflictError            the repository contains other content
    ├── FetchError               a mirror could not be reached or responded with an error
    └── VerificationError        exit code 3: a signature, chain or hash check failed
        ├── SignatureError       the CMS signature or its certificate chain
        ├── ManifestError        a manifest that is not well formed or unsafe
        └── IntegrityError       bytes that do not match their SHA-256 or size

Every message names the value involved and, where there is one, the fix.
"""

from __future__ import annotations


class RelmanError(Exception):
    """Base class: an operation failed in a way the user can act on."""

    exit_code = 1


class InputError(RelmanError):
    """A path, version or option given by the user is invalid."""


class ConflictError(RelmanError):
    """The target already contains different content under the same name."""


class FetchError(RelmanError):
    """A mirror could not be reached, or responded with an unexpected status."""


class VerificationError(RelmanError):
    """A signature, certificate chain or content hash did not verify."""

    exit_code = 3


class SignatureError(VerificationError):
    """The CMS signature or the signer's certificate chain is not acceptable."""


class IntegrityError(VerificationError):
    """Bytes do not match the SHA-256 digest or the size they were declared with."""


class ManifestError(VerificationError):
    """A manifest is malformed, or names a path that is not safe to deploy.

    It counts as a verification failure: a signed manifest that fails these
    checks must not be deployed, even when its signer is trusted.
    """
