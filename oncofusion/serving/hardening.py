"""Put the guard, the app's own routes and the log filter in front of a running MONAI Label server.

Called once when the app starts serving (MONAI Label creates the app inside its FastAPI lifespan, after
its routes and middleware exist), so ``monailabel start_server --app apps/oncofusion`` is hardened
without a special entry point. Configuration comes from ``--conf`` (see :func:`settings_from_conf`).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request

from oncofusion.serving.auth import TokenVerifier
from oncofusion.serving.endpoints import EndpointLimits, build_router
from oncofusion.serving.guard import GuardConfig, RequestGuard
from oncofusion.serving.policy import ROLES, role_satisfied
from oncofusion.serving.privacy import install_privacy_filter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HardeningSettings:
    guard: GuardConfig
    limits: EndpointLimits


def _verifier(conf: Mapping[str, str], auth_enabled: bool) -> TokenVerifier | None:
    """MONAI Label's auth switch decides; the key comes from ``--conf auth_public_key`` (nothing fetched)
    or, when absent, from the identity server MONAI Label is configured with."""
    from cachetools.keys import hashkey
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import get_public_key

    key_file = conf.get("auth_public_key", "")
    if key_file and not auth_enabled:
        raise RuntimeError("--conf auth_public_key is set but MONAI_LABEL_AUTH_ENABLE is not true: set both "
                           "(MONAI Label's own endpoints read that variable)")
    if not auth_enabled:
        return None
    realm = settings.MONAI_LABEL_AUTH_REALM_URI
    if key_file:
        key = Path(key_file).read_text()
        get_public_key.cache[hashkey(realm)] = key  # stock route dependencies verify with the same key
    else:
        try:
            key = get_public_key(realm)
        except Exception as e:
            raise RuntimeError(f"authentication is on but the signing key cannot be fetched from {realm} "
                               f"({type(e).__name__}): give it with --conf auth_public_key <pem file>") from e
    roles = {settings.MONAI_LABEL_AUTH_ROLE_USER: "user", settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR: "annotator",
             settings.MONAI_LABEL_AUTH_ROLE_REVIEWER: "reviewer", settings.MONAI_LABEL_AUTH_ROLE_ADMIN: "admin"}
    return TokenVerifier(key, roles, roles_claim=settings.MONAI_LABEL_AUTH_TOKEN_ROLES,
                         username_claim=settings.MONAI_LABEL_AUTH_TOKEN_USERNAME)


def settings_from_conf(conf: Mapping[str, str], auth_enabled: bool) -> HardeningSettings:
    """``--conf`` keys: ``max_upload_mb`` (1024), ``cors_origins`` (comma list, none by default),
    ``auth_public_key`` (PEM file), ``infer_workers`` (1), ``max_params_kb`` (256), ``max_text_chars``
    (20000)."""
    origins = tuple(o.strip().rstrip("/") for o in conf.get("cors_origins", "").split(",") if o.strip())
    guard = GuardConfig(max_body_bytes=int(float(conf.get("max_upload_mb", 1024)) * 2**20), cors_origins=origins,
                        verifier=_verifier(conf, auth_enabled))
    limits = EndpointLimits(infer_workers=max(1, int(conf.get("infer_workers", 1))),
                            max_field_bytes=int(float(conf.get("max_params_kb", 256)) * 1024),
                            max_text_chars=int(conf.get("max_text_chars", 20_000)))
    return HardeningSettings(guard, limits)


def harden(fastapi_app: Any, settings: HardeningSettings, private_roots: list[str]) -> None:
    """Routes first, guard outermost, log filter on every handler; warn when reachable beyond loopback
    without authentication."""
    router = build_router(settings.limits)
    count = len(fastapi_app.router.routes)
    fastapi_app.include_router(router)
    added = fastapi_app.router.routes[count:]
    del fastapi_app.router.routes[count:]
    fastapi_app.router.routes[:0] = added
    if settings.guard.verifier is not None:
        _trust_the_guard(fastapi_app)
    stack = fastapi_app.middleware_stack or fastapi_app.build_middleware_stack()
    fastapi_app.middleware_stack = RequestGuard(stack, settings.guard)
    install_privacy_filter([*private_roots, tempfile.gettempdir()])
    if settings.guard.verifier is None and _bound_beyond_loopback(sys.argv):
        logger.warning("serving on all interfaces WITHOUT authentication: pass --host 127.0.0.1, or turn "
                       "authentication on (apps/oncofusion/README.md)")


def _trust_the_guard(fastapi_app: Any) -> None:
    """Stock routes check roles again through ``get_current_user``, which decodes the token without naming
    an algorithm (refused by PyJWT 2) and knows no role hierarchy: answer it with the user the guard
    verified, holding every MONAI Label role at or below the token's highest."""
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import User, get_current_user

    names = {"user": settings.MONAI_LABEL_AUTH_ROLE_USER, "annotator": settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR,
             "reviewer": settings.MONAI_LABEL_AUTH_ROLE_REVIEWER, "admin": settings.MONAI_LABEL_AUTH_ROLE_ADMIN}

    async def verified_user(request: Request) -> User:  # Request resolved from module globals
        username, roles = request.scope.get("state", {}).get("user", ("", []))
        held = [role for role in ROLES if role_satisfied(role, roles)]
        return User(username=username or "anonymous", roles=[names[role] for role in held])

    fastapi_app.dependency_overrides[get_current_user] = verified_user


def _bound_beyond_loopback(argv: list[str]) -> bool:
    """``monailabel start_server`` binds 0.0.0.0 unless ``--host`` says otherwise."""
    host = argv[argv.index("--host") + 1] if "--host" in argv[:-1] else "0.0.0.0"
    return host not in ("127.0.0.1", "localhost", "::1")
