"""docker-compose.yml stays scalable: what ``--scale worker=N`` and a second listener need.

The compose test (``make compose-test``, deploy/compose_test.py) runs it for real with two listeners and
three workers; these checks read the file only, so a change that would break scaling fails here
in a second, on any machine.
"""

import re
from pathlib import Path

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker-compose.yml"


def _services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def _default(value: str) -> str:
    """``${NAME:-default}`` -> ``default`` (compose's own default of a setting)."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def test_workers_can_be_replicated():
    worker = _services()["worker"]
    # a fixed name, host name or published port would let only one replica start
    assert "container_name" not in worker and "hostname" not in worker and "ports" not in worker
    assert "storage:/data" in worker["volumes"]  # every replica on the same storage
    assert _default(str(worker["deploy"]["replicas"])) == "1"


def test_each_listener_publishes_a_port_of_its_own_on_the_same_storage():
    services = _services()
    listeners = {name: s for name, s in services.items() if s.get("command") == ["pacsbridge", "listener"]}
    assert set(listeners) == {"listener", "listener-2"}
    published = [_default(s["ports"][0]) for s in listeners.values()]
    assert all(len(s["ports"]) == 1 for s in listeners.values())
    assert len({p.rsplit(":", 1)[0] for p in published}) == len(published)  # distinct host ports
    for s in listeners.values():
        assert "storage:/data" in s["volumes"] and "container_name" not in s
        assert s["environment"]["PACSBRIDGE_STORAGE"] == "/data"
    # the second listener is off unless asked for, and never more than one (its port)
    assert _default(str(listeners["listener-2"]["deploy"]["replicas"])) == "0"
    assert "deploy" not in listeners["listener"]
