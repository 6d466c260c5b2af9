"""pyconquest's special columns: RT structure, plan and dose summaries.

With ``PACSBRIDGE_SPECIAL_COLUMNS=1`` (or ``--special-columns``) DICOMImages
gets pyconquest's extra columns, under pyconquest's names:

- ``ElementCount``: number of ROIs (RTSTRUCT) or beams (RTPLAN)
- ``ElementList``: ROI names (RTSTRUCT) or beam names (RTPLAN), joined with ``\\``
- ``Nfractions``: planned fractions (RTPLAN)
- ``UniqueFOR_UID``: the frame of reference shared by every ROI (RTSTRUCT)
- ``ReferencedSeriesUID``: the image series an RTSTRUCT (or a REG) refers to
- ``ReferencedSOPUID``: the RTSTRUCT a plan refers to, the plan a dose refers to
"""

from __future__ import annotations

from typing import Any

from pacsbridge.shared.core.dicomsql import SPECIAL_COLUMNS

__all__ = ["SPECIAL_COLUMNS", "special_values"]





def _items(ds: Any, keyword: str) -> list[Any]:
    value = ds.get(keyword)
    return list(value) if value else []


def special_values(ds: Any) -> dict[str, str]:
    """Compute the special columns for one dataset (empty for other modalities).

    Never raises for a malformed RT object: what cannot be found stays empty.
    """
    modality = str(ds.get("Modality", "") or "")
    out: dict[str, str] = {}
    if modality == "RTSTRUCT":
        rois = _items(ds, "StructureSetROISequence")
        names = [str(r.get("ROIName", "") or "") for r in rois]
        out["ElementCount"] = str(len(rois))
        out["ElementList"] = "\\".join(names)
        frames = {str(r.get("ReferencedFrameOfReferenceUID", "") or "") for r in rois}
        if len(frames) == 1:
            out["UniqueFOR_UID"] = frames.pop()
        for ref_for in _items(ds, "ReferencedFrameOfReferenceSequence"):
            for study in _items(ref_for, "RTReferencedStudySequence"):
                for series in _items(study, "RTReferencedSeriesSequence"):
                    uid = series.get("SeriesInstanceUID")
                    if uid:
                        out["ReferencedSeriesUID"] = str(uid)
                        break
                if "ReferencedSeriesUID" in out:
                    break
            if "ReferencedSeriesUID" in out:
                break
    elif modality == "RTPLAN":
        groups = _items(ds, "FractionGroupSequence")
        fractions = [str(g.get("NumberOfFractionsPlanned", "") or "") for g in groups]
        beams = _items(ds, "BeamSequence")
        if fractions:
            out["Nfractions"] = "\\".join(fractions)
        out["ElementCount"] = str(len(beams))
        out["ElementList"] = "\\".join(str(b.get("BeamName", "") or "") for b in beams)
        refs = _items(ds, "ReferencedStructureSetSequence")
        if refs and refs[0].get("ReferencedSOPInstanceUID"):
            out["ReferencedSOPUID"] = str(refs[0].ReferencedSOPInstanceUID)
    elif modality == "RTDOSE":
        refs = _items(ds, "ReferencedRTPlanSequence")
        if refs and refs[0].get("ReferencedSOPInstanceUID"):
            out["ReferencedSOPUID"] = str(refs[0].ReferencedSOPInstanceUID)
    elif modality == "REG":
        refs = _items(ds, "ReferencedSeriesSequence")
        if refs and refs[0].get("SeriesInstanceUID"):
            out["ReferencedSeriesUID"] = str(refs[0].SeriesInstanceUID)
    return {k: v for k, v in out.items() if v}
