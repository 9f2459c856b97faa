"""The stored job result (``pacs_ai.results``): one written shape, and the rows earlier versions wrote still read.

The JSON blobs below are written out by hand, as the job store holds them (the first one verbatim as the
worker stored it before the typed records existed), so the expected values do not come from the code
under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacs_ai.errors import ResultFormatError
from pacs_ai.results import (
    Classification,
    JobResult,
    ResultFiles,
    RoutingOutcome,
    ShadowScore,
    StudyImage,
    StudyLeftOut,
    StudyResult,
)
from pacs_ai.send.deliveries import result_file_map

# A done job's result as the worker stored it before this module (job_result() + routing + shadow).
OLD_DONE = json.loads("""
{"probability": 0.8125, "fractured": true, "label": "fractured", "threshold": 0.42,
 "model_name": "fracture-classifier", "model_version": "1.2.0", "architecture": "densenet121",
 "timings": {"preprocess": 0.101, "forward": 0.052, "cam": 0.031, "read": 0.01, "fsync": 0.002},
 "files": {"sc": "/r/7/sc.dcm", "sr": "/r/7/sr.dcm", "overlay": "/r/7/overlay.png",
           "sc_sop_instance_uid": "2.25.11", "sr_sop_instance_uid": "2.25.12",
           "series_instance_uids": {"sc": "2.25.13", "sr": "2.25.14"}, "roi": [10, 20, 110, 220]},
 "routing": {"action": "analyse", "rule": "intended_use", "reason": "all criteria hold"},
 "shadow": [{"model_name": "candidate", "model_version": "2.0", "architecture": "resnet50",
             "probability": 0.25, "fractured": false, "threshold": 0.5, "seconds": 0.04},
            {"model_name": "broken", "model_version": "0.1", "error": "RuntimeError: out of memory"}]}
""")


def test_old_done_row_reads_into_the_records() -> None:
    r = JobResult.from_json(OLD_DONE)
    assert r.classification == Classification(0.8125, True, 0.42, "fractured", "fracture-classifier", "1.2.0", "densenet121")
    assert r.files == ResultFiles(
        sc=Path("/r/7/sc.dcm"),
        sr=Path("/r/7/sr.dcm"),
        overlay=Path("/r/7/overlay.png"),
        sc_sop_instance_uid="2.25.11",
        sr_sop_instance_uid="2.25.12",
        sc_series_instance_uid="2.25.13",
        sr_series_instance_uid="2.25.14",
        roi=(10, 20, 110, 220),
        region=(10, 20, 110, 220),  # an earlier row: its SR reported the suspected region
    )
    assert dict(r.timings) == {"preprocess": 0.101, "forward": 0.052, "cam": 0.031, "read": 0.01, "fsync": 0.002}
    assert r.routing == RoutingOutcome("analyse", "intended_use", "all criteria hold")
    assert r.shadow == (
        ShadowScore("candidate", "2.0", "resnet50", 0.25, False, 0.5, 0.04),
        ShadowScore("broken", "0.1", error="RuntimeError: out of memory"),
    )
    assert [s.scored for s in r.shadow] == [True, False]
    # the current shape is the old one: written back, it is the same document
    assert r.to_json() == OLD_DONE
    assert result_file_map(r) == {"sc": Path("/r/7/sc.dcm"), "sr": Path("/r/7/sr.dcm")}


def test_old_skipped_row() -> None:
    r = JobResult.from_json({"routing": {"action": "skip", "rule": "intended_use.body_part", "reason": "CHEST"}})
    assert r.classification is None and r.files is None and not r.analysed
    assert r.routing == RoutingOutcome("skip", "intended_use.body_part", "CHEST")
    assert r.to_json() == {"routing": {"action": "skip", "rule": "intended_use.body_part", "reason": "CHEST"}}


def test_earlier_file_shapes_read_as_the_one_files_record() -> None:
    # files as a list of paths (the .dcm ones are delivered, SC then SR)
    listed = JobResult.from_json({"probability": 0.1, "fractured": False, "threshold": 0.5,
                                  "files": ["/r/1/sc.dcm", "/r/1/overlay.png", "/r/1/sr.dcm"]})
    assert listed.files == ResultFiles(sc=Path("/r/1/sc.dcm"), sr=Path("/r/1/sr.dcm"))
    assert listed.classification is not None and listed.classification.label == "not_fractured"
    # result files at the top level, beside the classification
    flat = JobResult.from_json({"probability": 0.9, "fractured": True, "threshold": 0.5, "label": "fractured",
                                "sc": "/r/2/sc.dcm", "sr": "/r/2/sr.dcm", "sr_sop_instance_uid": "2.25.9"})
    assert flat.files == ResultFiles(sc=Path("/r/2/sc.dcm"), sr=Path("/r/2/sr.dcm"), sr_sop_instance_uid="2.25.9")
    assert flat.to_json()["files"] == {"sc": "/r/2/sc.dcm", "sr": "/r/2/sr.dcm", "sr_sop_instance_uid": "2.25.9", "roi": None}
    assert result_file_map(flat) == {"sc": Path("/r/2/sc.dcm"), "sr": Path("/r/2/sr.dcm")}
    # a result without timings (earlier versions) reads with none
    assert dict(flat.timings) == {}


def test_the_reported_region_is_kept_where_it_is_not_the_roi() -> None:
    """A negative's SR reports the heat map's hottest region (roi None); a result without a heat map
    reports the whole image (both None): each reads back as written."""
    negative = ResultFiles(sc=Path("/r/3/sc.dcm"), roi=None, region=(5, 6, 50, 60))
    assert negative.to_json() == {"sc": "/r/3/sc.dcm", "roi": None, "region": [5, 6, 50, 60]}
    assert ResultFiles.from_json(negative.to_json()) == negative
    whole = ResultFiles(sc=Path("/r/4/sc.dcm"))
    assert whole.to_json() == {"sc": "/r/4/sc.dcm", "roi": None}
    assert ResultFiles.from_json(whole.to_json()) == whole


@pytest.mark.parametrize(
    "doc, field",
    [
        ([1, 2], "result"),
        ({"probability": "high", "fractured": True}, "probability"),
        ({"probability": 0.5, "fractured": "yes"}, "fractured"),
        ({"files": {"sc": 7}}, "files.sc"),
        ({"files": {"sc": "/a/sc.dcm", "roi": [1, 2]}}, "files.roi"),
        ({"files": {"sc": "/a/sc.dcm", "region": "whole"}}, "files.region"),
        ({"shadow": {"model_name": "x"}}, "shadow"),
    ],
)
def test_a_result_no_version_wrote_is_refused_naming_the_field(doc: object, field: str) -> None:
    with pytest.raises(ResultFormatError, match=f"'{field}'"):
        JobResult.from_json(doc)


def test_read_of_an_absent_result() -> None:
    assert JobResult.read(None) is None


# A study result as the study processor stored it before the typed record (with the store's revision).
OLD_STUDY = json.loads("""
{"probability": 0.61, "fractured": true, "threshold": 0.5, "rule": "max", "rule_source": "config",
 "model_name": "fracture-classifier", "model_version": "1.2.0",
 "images": [{"job_id": 3, "sop_instance_uid": "2.25.3", "series_instance_uid": "2.25.30",
             "probability": 0.61, "fractured": true}],
 "not_analysed": [{"job_id": 4, "sop_instance_uid": "2.25.4", "state": "skipped", "reason": "intended_use.body_part"}],
 "forced": false, "files": {"sr": "/r/studies/2.25.1/study-sr.dcm"},
 "sr_sop_instance_uid": "2.25.40", "sr_series_instance_uid": "2.25.41", "revision": 2}
""")


def test_old_study_result_reads_and_writes_back_the_same() -> None:
    r = StudyResult.from_json(OLD_STUDY)
    assert (r.probability, r.fractured, r.threshold, r.rule, r.revision) == (0.61, True, 0.5, "max", 2)
    assert r.sr == Path("/r/studies/2.25.1/study-sr.dcm") and r.sr_sop_instance_uid == "2.25.40"
    assert r.images == (StudyImage(3, "2.25.3", "2.25.30", 0.61, True),)
    assert r.not_analysed == (StudyLeftOut(4, "2.25.4", "skipped", "intended_use.body_part"),)
    assert r.to_json() == OLD_STUDY
    with pytest.raises(ResultFormatError, match="files.sr"):
        StudyResult.from_json({**OLD_STUDY, "files": {}})
