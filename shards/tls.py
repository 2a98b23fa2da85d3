"""TLS trust of every https:// read: the CAs the environment names now, and how a failed verification is named.

Certificates are always verified, host name included. A private CA is trusted by naming a bundle holding it in
SSL_CERT_FILE (or a hashed directory in SSL_CERT_DIR), as Python's `ssl` and OpenSSL read them; otherwise the
system's CAs. libcurl (shards.remote's default client) is given the same paths when a store makes its loop. aiohttp
(fsspec's HTTP filesystem: manifests, and shards with `RemoteConfig(http_client="fsspec")`) would use the default
context it made once, when it was imported, so a CA trusted after that (a later loader, a notebook) would be
ignored: it is handed `tls_context()` instead, made anew only when the paths change, since fsspec keys its cached
filesystems (and their connections) on their options.

A failed verification (untrusted issuer, another host name, expired) is permanent: another try meets the same
certificate. s3:// is the exception to SSL_CERT_FILE: botocore verifies with AWS_CA_BUNDLE, else certifi's bundle.
"""
from __future__ import annotations

import functools
import ssl


def verify_paths() -> tuple[str | None, str | None]:
    """(CA file, CA directory) to verify servers with: SSL_CERT_FILE / SSL_CERT_DIR when set (and existing), else
    the system's; read from the environment at each call."""
    paths = ssl.get_default_verify_paths()
    return paths.cafile, paths.capath


def tls_context() -> ssl.SSLContext:
    """A verifying client context for the CAs `verify_paths()` names now (the same object while they stay)."""
    return _context(*verify_paths())


def fsspec_tls_options(protocol: str) -> dict:
    """The storage option that makes fsspec's HTTP filesystem (aiohttp) verify with `tls_context()`, for http(s);
    none for other protocols (s3fs verifies through botocore: AWS_CA_BUNDLE)."""
    return {"ssl": tls_context()} if protocol in ("http", "https") else {}


@functools.lru_cache(maxsize=8)
def _context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile, capath=capath)   # both None: the platform's defaults


def not_verified(detail: str, s3: bool = False) -> str:
    """The words of every error for a server certificate that failed verification. s3:// goes through botocore,
    which verifies with its own CA bundle (certifi's) unless AWS_CA_BUNDLE names one, not with SSL_CERT_FILE."""
    trust = "AWS_CA_BUNDLE (s3://, botocore's)" if s3 else "SSL_CERT_FILE"
    return (f"the server's TLS certificate could not be verified ({detail.rstrip('.')}); a private CA is trusted "
            f"through {trust}")


def certificate_failure(e: BaseException) -> str | None:
    """`not_verified` for `e` if it is, or was raised from or while handling, ssl's certificate verification error;
    None for any other error. (aiohttp's ClientConnectorCertificateError is one too, raised from ssl's, which says
    why; botocore's SSLError, which s3fs raises, is raised while handling aiohttp's.)"""
    chain: list[BaseException] = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    failed = [c for c in chain if isinstance(c, ssl.SSLCertVerificationError)]
    if not failed:
        return None
    s3 = any(type(c).__module__.split(".")[0] in ("botocore", "aiobotocore") for c in chain)
    return not_verified(next((c.verify_message for c in failed if getattr(c, "verify_message", None)),
                             str(failed[-1])), s3=s3)
