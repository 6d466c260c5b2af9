"""The HTTP API (``pacsbridge api``; gunicorn: ``gunicorn 'pacsbridge.api:create_app()'``).

Routes live under ``/api/v1`` (one blueprint per resource module: :mod:`.nodes`,
:mod:`.jobs`, :mod:`.browse`, :mod:`.quarantine`, :mod:`.projects`), plus ``/healthz`` and ``/metrics``
(:mod:`.health`) and the OpenAPI document ``/api/v1/openapi.json``, generated from the
views' operations and the pydantic models (:mod:`.contract`, :mod:`.models`). Every error has one shape
(:mod:`.errors`); every route but
``/healthz``, ``/metrics`` and the OpenAPI document needs a bearer token
(:mod:`.auth`).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

from flask import Flask

from pacsbridge.shared.core.config import Settings, load_settings

__all__ = ["create_app", "API_PREFIX", "MAX_BODY"]

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
#: Largest request body accepted (413 beyond).
MAX_BODY = 1024 * 1024


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the API application.

    Parameters
    ----------
    test_config : Mapping, optional
        Flask config overrides; ``SETTINGS`` (a :class:`~pacsbridge.shared.core.config.Settings`)
        replaces the settings read from the environment.

    Raises
    ------
    ConfigError
        A malformed setting (e.g. a ``PACSBRIDGE_API_TOKENS`` entry), or a ``PACSBRIDGE_DEID_SECRET``
        that is not the secret of the projects in the database (DeidSecretError).
    """
    from . import (auth, browse, cohorts, contract, deletion, errors, health, jobs, metrics, nodes, params, projects,
                   quarantine, results)
    from .state import ApiState

    app = Flask("pacsbridge.api")
    app.config.update(MAX_CONTENT_LENGTH=MAX_BODY, JSON_SORT_KEYS=False)
    if test_config:
        app.config.update(test_config)
    settings: Settings = app.config.get("SETTINGS") or load_settings()
    app.config["SETTINGS"] = settings
    app.json.sort_keys = False  # type: ignore[attr-defined]

    api_state = ApiState(settings)
    app.extensions["pacsbridge"] = api_state
    if not api_state.tokens:
        log.warning("PACSBRIDGE_API_TOKENS is empty: every route but /healthz and /metrics answers 401 "
                    "(set name:token[:role] entries to use the API)")

    errors.register(app)
    app.before_request(auth.authenticate)
    app.before_request(params.check_text)  # after the token: a stranger learns nothing from a 400
    metrics.init_app(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(contract.bp, url_prefix=API_PREFIX)
    app.register_blueprint(nodes.bp, url_prefix=API_PREFIX)
    app.register_blueprint(jobs.bp, url_prefix=API_PREFIX)
    app.register_blueprint(browse.bp, url_prefix=API_PREFIX)
    app.register_blueprint(deletion.bp, url_prefix=API_PREFIX)
    app.register_blueprint(quarantine.bp, url_prefix=API_PREFIX)
    app.register_blueprint(projects.bp, url_prefix=API_PREFIX)
    app.register_blueprint(results.bp, url_prefix=API_PREFIX)
    app.register_blueprint(cohorts.bp, url_prefix=API_PREFIX)
    return app
