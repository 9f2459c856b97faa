"""Results of different source images of one study stay apart in a viewer (issue 10, point 4).

The two views of field case c16, and two images that both say Series 1 / Instance 1 (what many modalities
send), must give SC and SR series with distinct Series Numbers, distinct Instance Numbers, and Series
Descriptions that name their source and differ; reprocessing keeps the numbers (like the UIDs).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from pacs_ai.infer.preprocess import InputSpec, dicom_to_gray, prepare
from pacs_ai.write.results import write_results
from support.predictions import synthetic_prediction

FIELD_CASES = Path(__file__).resolve().parent / "data" / "field_cases"


def _results(sources: list[pydicom.Dataset], tmp_path: Path) -> list[dict[str, pydicom.Dataset]]:
    out = []
    for i, ds in enumerate(sources):
        files = write_results(ds, prepare(dicom_to_gray(ds), InputSpec()), synthetic_prediction("resnet50", i % 2 == 0), tmp_path / str(i)).files
        out.append({k: pydicom.dcmread(path) for k, path in files.dicom_files().items()})
    return out


def _check_apart(results: list[dict[str, pydicom.Dataset]]) -> None:
    objects = [r[k] for r in results for k in ("sc", "sr")]
    series = [(o.SeriesInstanceUID, int(o.SeriesNumber)) for o in objects]
    assert len({uid for uid, _ in series}) == len(objects)
    assert len({n for _, n in series}) == len(objects), f"series numbers collide: {series}"
    for kind in ("sc", "sr"):
        instances = [int(r[kind].InstanceNumber) for r in results]
        assert len(set(instances)) == len(results), f"{kind} instance numbers collide: {instances}"
        descriptions = [str(r[kind].SeriesDescription) for r in results]
        assert len(set(descriptions)) == len(results), descriptions
        for d in descriptions:
            assert len(d) <= 64 and "NOT FOR DIAGNOSTIC USE" in d
    for o in objects:
        assert 1 <= int(o.SeriesNumber) <= 2**31 - 1 and 1 <= int(o.InstanceNumber) <= 2**31 - 1


def test_two_views_of_one_study(tmp_path: Path) -> None:
    sources = [pydicom.dcmread(FIELD_CASES / f"c16_study_view{i}.dcm") for i in (1, 2)]
    assert sources[0].StudyInstanceUID == sources[1].StudyInstanceUID
    results = _results(sources, tmp_path)
    _check_apart(results)
    for ds, r in zip(sources, results, strict=True):
        for kind in ("sc", "sr"):
            d = str(r[kind].SeriesDescription)
            # names the source: body part, laterality and its own series and instance number
            assert f"S{ds.SeriesNumber}" in d and f"I{ds.InstanceNumber}" in d and ds.BodyPartExamined in d
            assert f" {ds.Laterality} " in d


def test_images_that_all_say_series_1_instance_1(tmp_path: Path) -> None:
    base = pydicom.dcmread(FIELD_CASES / "c16_study_view1.dcm")
    sources = []
    for view in ("AP", "LAT", "AP"):
        ds = pydicom.dcmread(FIELD_CASES / "c16_study_view1.dcm")
        ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.SeriesNumber, ds.InstanceNumber, ds.ViewPosition = 1, 1, view
        sources.append(ds)
    assert base.StudyInstanceUID == sources[0].StudyInstanceUID
    results = _results(sources, tmp_path)
    objects = [r[k] for r in results for k in ("sc", "sr")]
    assert len({int(o.SeriesNumber) for o in objects}) == len(objects)
    assert len({int(r["sc"].InstanceNumber) for r in results}) == len(results)
    assert " AP " in str(results[0]["sc"].SeriesDescription) and " LAT " in str(results[1]["sc"].SeriesDescription)


def test_reprocessing_keeps_the_numbers(tmp_path: Path) -> None:
    ds = pydicom.dcmread(FIELD_CASES / "c16_study_view2.dcm")
    first, second = _results([ds], tmp_path / "a")[0], _results([ds], tmp_path / "b")[0]
    for kind in ("sc", "sr"):
        for keyword in ("SeriesNumber", "InstanceNumber", "SeriesDescription", "SeriesInstanceUID", "SOPInstanceUID"):
            assert first[kind][keyword].value == second[kind][keyword].value


@pytest.mark.parametrize("missing", ["SeriesNumber", "InstanceNumber", "BodyPartExamined", "Laterality"])
def test_description_without_some_source_attributes(missing: str, tmp_path: Path) -> None:
    ds = pydicom.dcmread(FIELD_CASES / "c16_study_view1.dcm")
    del ds[missing]
    r = _results([ds], tmp_path)[0]
    assert "NOT FOR DIAGNOSTIC USE" in str(r["sc"].SeriesDescription)
