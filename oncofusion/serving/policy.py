"""Who may call which endpoint: one table for every route the server answers.

MONAI Label 0.8.5 serves every endpoint to anyone unless authentication is on, including ones this app
does not use that delete studies, overwrite weights, zip the whole datastore or serve the server log.
Here each route names the least role it needs (MONAI Label's roles: user < annotator < reviewer < admin)
and whether it is *administrative*: administrative routes are off unless authentication is on, since
without it nothing tells an administrator from anyone who can reach the port. A route not in the table
answers 404.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: MONAI Label's role hierarchy, least first; a token holding a role may do what the roles below it may
ROLES = ("user", "annotator", "reviewer", "admin")


@dataclass(frozen=True)
class Rule:
    """``methods`` on paths matching ``pattern`` need ``role`` (None: public, no token needed)."""

    methods: frozenset[str]
    pattern: re.Pattern[str]
    role: str | None
    administrative: bool = False


def _rule(methods: str, pattern: str, role: str | None, administrative: bool = False) -> Rule:
    return Rule(frozenset(methods.split()), re.compile(pattern), role, administrative)


RULES: tuple[Rule, ...] = (
    # documentation, static pages and MONAI Label's own login endpoints
    _rule("GET", r"/|/docs|/openapi\.json|/favicon\.ico|/static/.*|/auth/.*", None),
    _rule("POST", r"/auth/token", None),
    _rule("GET", r"/ohif(/.*)?", "user"),  # stock OHIF asks for the user role too
    # what a viewer does while reading studies
    _rule("GET", r"/info/?", "user"),
    _rule("POST", r"/infer/[^/]+", "user"),
    _rule("POST", r"/activelearning/[^/]+", "user"),
    _rule("GET", r"/datastore/?|/datastore/(image|label)(/info)?", "user"),
    _rule("GET", r"/train/?|/scoring/?", "user"),
    _rule("GET", r"/session/[^/]+", "user"),
    _rule("PUT", r"/session/?", "user"),
    _rule("DELETE", r"/session/[^/]+", "user"),
    _rule("GET POST", r"/proxy/dicom/.*", "user"),
    # what an annotator submits
    _rule("PUT", r"/datastore/image|/datastore/label|/datastore/label/info|/datastore/updatelabelinfo", "annotator"),
    _rule("POST", r"/scoring/[^/]*", "annotator"),
    # administration: off without authentication
    _rule("PUT", r"/datastore/image/info", "admin", administrative=True),
    _rule("POST", r"/train/[^/]*", "admin"),
    _rule("DELETE", r"/train/?", "admin"),
    _rule("DELETE", r"/datastore/(image|label)", "admin", administrative=True),
    _rule("GET", r"/datastore/dataset", "admin", administrative=True),
    _rule("GET PUT DELETE", r"/model/.*", "admin", administrative=True),
    _rule("GET", r"/logs/?.*", "admin", administrative=True),
    _rule("POST", r"/reload", "admin", administrative=True),
)


@dataclass(frozen=True)
class Access:
    """The decision for one request: ``allowed`` or a ``status`` and ``reason``; ``role`` to check."""

    allowed: bool
    role: str | None = None
    status: int = 200
    reason: str = ""


def access(method: str, path: str, auth_enabled: bool) -> Access:
    """Look ``method path`` up in :data:`RULES` (a trailing slash does not matter)."""
    method = "GET" if method == "HEAD" else method  # HEAD answers what GET would, without the body
    known_path = False
    for rule in RULES:
        if not rule.pattern.fullmatch(path):
            continue
        known_path = True
        if method not in rule.methods:
            continue
        if rule.administrative and not auth_enabled:
            return Access(False, rule.role, 403, f"{method} {path} is an administrative endpoint, off on a server "
                                                 "without authentication (see apps/oncofusion/README.md)")
        return Access(True, rule.role)
    if known_path and method != "OPTIONS":
        return Access(False, None, 405, f"{method} is not allowed on {path}")
    if method == "OPTIONS":
        return Access(True, None)
    return Access(False, None, 404, f"no endpoint {path}")


def role_satisfied(required: str | None, held: list[str] | tuple[str, ...]) -> bool:
    """A user holding a higher role may do what a lower role may (admin > reviewer > annotator > user)."""
    if required is None:
        return True
    rank = ROLES.index(required)
    return any(role in ROLES and ROLES.index(role) >= rank for role in held)
