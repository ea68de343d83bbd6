"""sipis.api: the HTTPS API the apps call (SPEC.md "HTTPS API").

schemas (pure JSON validation/serialisation) → problems (RFC 9457 errors) → app (Starlette
routes over the instance service) → server (hypercorn, trio, TLS); openapi describes it all,
tls makes the development certificate.
"""
