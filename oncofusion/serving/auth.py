"""Bearer tokens checked against a public key held in the server's configuration.

MONAI Label's auth mode (``MONAI_LABEL_AUTH_ENABLE=true``) fetches the signing key from an identity
server (Keycloak realm) on the first request. A hospital server is often air-gapped, so the key may
instead be given as a PEM file (``--conf auth_public_key``): tokens issued by the site's identity
provider are then verified locally and nothing is fetched. Roles are read from the claim MONAI Label
reads (``MONAI_LABEL_AUTH_TOKEN_ROLES``, Keycloak's ``realm_access#roles`` by default) and mapped from
MONAI Label's role names to :data:`~oncofusion.serving.policy.ROLES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from oncofusion.contract import InvalidRequest

#: algorithms accepted for a public key; symmetric ones are refused (a public key is no secret)
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512", "EdDSA")


@dataclass(frozen=True)
class TokenVerifier:
    """Verify a bearer token's signature and expiry; return the roles it grants.

    ``role_names``: MONAI Label role name -> role of :data:`~oncofusion.serving.policy.ROLES`, e.g.
    ``{"monailabel-admin": "admin", ...}``. ``roles_claim``: ``#``-separated path to the roles list.
    """

    public_key: str
    role_names: Mapping[str, str]
    roles_claim: str = "realm_access#roles"
    username_claim: str = "preferred_username"

    def verify(self, authorization: str | None) -> tuple[str, list[str]]:
        """``Authorization`` header -> (username, roles); 401 naming what is wrong otherwise."""
        if not authorization:
            raise InvalidRequest("authentication required: send 'Authorization: Bearer <token>'", 401)
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise InvalidRequest("the Authorization header must be 'Bearer <token>'", 401)
        try:
            payload = jwt.decode(token.strip(), self.public_key, algorithms=list(ASYMMETRIC_ALGORITHMS),
                                 options={"verify_aud": False, "require": ["exp"]})
        except jwt.ExpiredSignatureError as e:
            raise InvalidRequest("the token has expired: sign in again", 401) from e
        except jwt.InvalidTokenError as e:
            raise InvalidRequest(f"the token is not valid: {e}", 401) from e
        return str(payload.get(self.username_claim, "")), self._roles(payload)

    def _roles(self, payload: Mapping[str, Any]) -> list[str]:
        value: Any = payload
        for key in self.roles_claim.split("#"):
            value = value.get(key) if isinstance(value, Mapping) else None
        names = value if isinstance(value, list) else []
        return [self.role_names[name] for name in names if name in self.role_names]
