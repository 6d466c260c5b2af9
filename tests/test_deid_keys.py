"""The keyed derivations of a project (shared/deid/keys.py) and the de-identification settings."""

from __future__ import annotations

import pytest

from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.core.errors import DeidSecretError
from pacsbridge.shared.deid.keys import KeyedIdentity, ProjectKey, secret, verify

SECRET = b"0123456789abcdef0123456789abcdef"


def test_derivations_are_keyed_by_secret_and_project_and_stable():
    a, b = ProjectKey(SECRET, "lung"), ProjectKey(SECRET, "lung")
    other_project, other_secret = ProjectKey(SECRET, "brain"), ProjectKey(SECRET[::-1], "lung")
    assert a.uid("1.2.3.4") == b.uid("1.2.3.4") and a.pseudonym("", "MRN1", "P", 8) == b.pseudonym("", "MRN1", "P", 8)
    for k in (other_project, other_secret):
        assert k.uid("1.2.3.4") != a.uid("1.2.3.4")
        assert k.pseudonym("", "MRN1", "P", 8) != a.pseudonym("", "MRN1", "P", 8)
        assert k.check != a.check
    # the issuer is part of the patient's identity; NUL separation: ("A", "BC") is not ("AB", "C")
    assert a.pseudonym("HOSP1", "MRN1", "P", 8) != a.pseudonym("HOSP2", "MRN1", "P", 8)
    assert a.digest("x", "A", "BC") != a.digest("x", "AB", "C")


def test_uids_are_valid_and_fit():
    key = ProjectKey(SECRET, "p")
    for original in ("1.2.3", "1.2.840.113619.2.55.3.604688119.969.1268071029.320"):
        for root in ("", "1.2.826.0.1.3680043.10.543", "1.2.3.4.5.6.7.8.9.10.11.12.13.14.15.16.17.18"):
            uid = key.uid(original, root)
            assert len(uid) <= 64 and uid.startswith((root or "2.25") + ".")
            last = uid.rsplit(".", 1)[1]
            assert last.isdigit() and (last == "0" or not last.startswith("0"))
    with pytest.raises(ValueError, match="fewer than 10 digits"):
        key.uid("1.2.3", "1." * 28 + "1")


def test_date_offsets_stay_in_range_and_never_zero():
    key = ProjectKey(SECRET, "p")
    offsets = {key.date_offset("", f"MRN{i}", -3, 3) for i in range(200)}
    assert offsets == {-3, -2, -1, 1, 2, 3}
    assert KeyedIdentity(key, min_days=-10, max_days=-10).patient("", "X").date_offset == -10


def test_a_wrong_or_missing_secret_is_refused():
    key = ProjectKey(SECRET, "p")
    verify(key, key.check)
    with pytest.raises(DeidSecretError, match="not the secret this project was made with"):
        verify(ProjectKey(SECRET + b"x", "p"), key.check)
    with pytest.raises(DeidSecretError, match="PACSBRIDGE_DEID_SECRET"):
        secret(Settings())
    assert secret(Settings(deid_secret=SECRET.decode())) == SECRET


def test_the_secret_comes_from_a_file_and_must_be_strong(tmp_path):
    from pydantic import ValidationError

    f = tmp_path / "deid"
    f.write_text(SECRET.decode() + "\n")
    assert Settings(deid_secret_file=f).deid_secret == SECRET.decode()
    assert "PACSBRIDGE_DEID_SECRET" not in Settings(deid_secret_file=f).environ()
    with pytest.raises(ValidationError, match="at least 32"):
        Settings(deid_secret="short")
    with pytest.raises(ValidationError, match="both set"):
        Settings(deid_secret_file=f, deid_secret="x" * 40)
    with pytest.raises(ValidationError, match="PACSBRIDGE_DEID_SECRET_FILE"):
        Settings(deid_secret_file=tmp_path / "missing")
