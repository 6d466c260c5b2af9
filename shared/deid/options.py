"""A de-identification project's configuration: the profile's options and the project's policies.

Kept as JSON in ``pacsbridge_projects.config`` and validated by :class:`ProjectConfig` wherever it is
read or written (API, CLI, jobs). The options are those of PS3.15 Table E.1-1 (their codes are
written into DeidentificationMethodCodeSequence, :data:`OPTION_CODES`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from pacsbridge.shared.core.models import TEXT_PATTERN, Model

__all__ = ["ProjectConfig", "Options", "PseudonymPolicy", "DateShift", "RiskPolicy", "TrialTags",
           "OPTION_CODES", "PROJECT_NAME_PATTERN", "RiskAction", "SAFE_PRIVATE_PATTERN"]

#: A project's name: a path segment of the API (``/api/v1/projects/<name>``), as a node's.
PROJECT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: A private attribute kept under Retain Safe Private: ``GGGG,creator,EE`` (group, private creator,
#: element offset within the creator's block), e.g. ``0019,GEMS_ACQU_01,0B``.
SAFE_PRIVATE_PATTERN = r"^[0-9A-Fa-f]{3}[13579BbDdFf],[^\\\x00-\x1f]{1,64},[0-9A-Fa-f]{2}$"
#: What happens to an instance of a risky kind: not sent and listed (``quarantine``), sent with a
#: warning in the job report (``warn``), or not sent and counted (``drop``).
RiskAction = Literal["quarantine", "warn", "drop"]
_Text64 = Annotated[str, Field(max_length=64, pattern=TEXT_PATTERN)]

#: PS3.16 CID 7050 codes (DCM) of the profile and its options, for DeidentificationMethodCodeSequence.
OPTION_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_pixel_data": ("113101", "Clean Pixel Data Option"),
    "clean_recognizable_visual_features": ("113102", "Clean Recognizable Visual Features Option"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "dates_keep": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "dates_shift": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}


class Options(Model):
    """The options of PS3.15 Table E.1-1 on top of the Basic Profile (all off: the Basic Profile alone)."""

    retain_safe_private: bool = Field(default=False, description="keep the private attributes of the safe-list")
    retain_uids: bool = Field(default=False, description="keep every UID as it is (no new UIDs)")
    retain_device_identity: bool = False
    retain_institution_identity: bool = False
    retain_patient_characteristics: bool = Field(default=False, description="keep sex, age, size, weight ...")
    dates: Literal["remove", "shift", "keep"] = Field(
        default="shift",
        description="remove: the Basic Profile's; shift: Retain Longitudinal Temporal Information with Modified "
                    "Dates (each patient's dates moved by the patient's offset); keep: ... with Full Dates")
    clean_descriptors: bool = Field(default=False, description="keep descriptions, cleaned of the instance's own "
                                                       "identifiers (names, IDs, accession number, dates)")
    clean_structured_content: bool = False
    clean_graphics: bool = False


class PseudonymPolicy(Model):
    """How a patient's pseudonym is made: ``prefix`` + ``digits`` digits from the project's key (a
    collision takes the next derivation), or the next unused entry of ``names``, or given per request."""

    prefix: Annotated[str, Field(max_length=32, pattern=r"^[A-Za-z0-9_.-]*$")] = "ANON"
    digits: Annotated[int, Field(ge=4, le=24)] = 8
    names: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]] = Field(
        default_factory=list, description="the project's own list, used in order (empty: prefix and digits)")


class DateShift(Model):
    """Each patient's offset in days, a keyed choice within ``[min_days, max_days]`` (0 never chosen)."""

    min_days: Annotated[int, Field(ge=-36500, le=36500)] = -365
    max_days: Annotated[int, Field(ge=-36500, le=36500)] = -1

    @model_validator(mode="after")
    def _ordered(self) -> "DateShift":
        if self.min_days > self.max_days:
            raise ValueError("min_days is after max_days")
        if self.min_days == self.max_days == 0:
            raise ValueError("an offset of 0 days shifts nothing: use dates 'keep'")
        return self


class RiskPolicy(Model):
    """What happens to instances that may carry identifying content the profile cannot clean."""

    burned_in_annotation: RiskAction = Field(default="quarantine", description="BurnedInAnnotation is YES")
    burned_in_likely: RiskAction = Field(
        default="quarantine", description="SOP classes that often carry burned-in text (secondary capture, ultrasound) "
                                  "without BurnedInAnnotation NO")
    structured_report: RiskAction = "quarantine"
    presentation_state: RiskAction = "quarantine"
    encapsulated_document: RiskAction = Field(default="quarantine", description="encapsulated PDF, CDA, STL ...")


class TrialTags(Model):
    """Clinical Trial Subject / Study / Series attributes written into every de-identified instance
    (the subject ID is the pseudonym). Empty ones are not written."""

    sponsor_name: _Text64 = ""
    protocol_id: _Text64 = ""
    protocol_name: _Text64 = ""
    site_id: _Text64 = ""
    site_name: _Text64 = ""
    time_point_id: _Text64 = ""


class ProjectConfig(Model):
    """Everything a project decides about what leaves under it."""

    options: Options = Field(default_factory=lambda: Options())
    pseudonyms: PseudonymPolicy = Field(default_factory=PseudonymPolicy)
    date_shift: DateShift = Field(default_factory=DateShift)
    uid_root: Annotated[str, Field(max_length=40, pattern=r"^(|[0-2](\.(0|[1-9][0-9]*))+)$")] = Field(
        "", description="root of new UIDs ('' = the 2.25 form of a keyed 128-bit number)")
    safe_private: list[Annotated[str, Field(pattern=SAFE_PRIVATE_PATTERN)]] | None = Field(
        None, description="private attributes kept under retain_safe_private (null: pacsbridge's default list)")
    risk: RiskPolicy = Field(default_factory=lambda: RiskPolicy())
    trial: TrialTags = Field(default_factory=TrialTags)
