"""Tests for report manifests, report text clean-up and the IU X-ray loaders (blip/data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blip.data import (
    DEID_TOKEN,
    ReportManifestError,
    ReportRecord,
    clean_report,
    join_sections,
    normalize_for_metrics,
    read_indiana,
    read_r2gen_annotation,
    read_report_manifest,
    split_sections,
    write_report_manifest,
)

IU_XRAY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "iu_xray"


@pytest.fixture(scope="module")
def iu_xray() -> Path:
    if not (IU_XRAY / "indiana_reports.csv").is_file():
        pytest.skip(f"IU X-ray sample data not present at {IU_XRAY}")
    return IU_XRAY


@pytest.fixture(scope="module")
def indiana(iu_xray):
    return read_indiana(
        iu_xray / "indiana_reports.csv",
        iu_xray / "indiana_projections.csv",
        iu_xray / "images",
        views=("Frontal", "Lateral"),
    )


# ---------------------------------------------------------------- report text


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("  Heart   size\nnormal.  ", "Heart size normal."),
        ("There are no XXXX of a pleural effusion.", f"There are no {DEID_TOKEN} of a pleural effusion."),
        ("Inferior XXXX XXXX XXXX.", f"Inferior {DEID_TOKEN}."),
        ("Normal chest x-XXXX.", f"Normal chest x-{DEID_TOKEN}."),
        ("1. Bullous emphysema. 2. Scarring in the left apex.", "Bullous emphysema. Scarring in the left apex."),
        ("Impression: 1) Clear lungs.", "Impression: Clear lungs."),
        ("A 1.5 cm nodule. T12. 3 views.", "A 1.5 cm nodule. T12. 3 views."),
        ("No effusion.. Heart normal , lungs clear ..", "No effusion. Heart normal, lungs clear."),
        ("in the left lung apex.There are opacities", "in the left lung apex. There are opacities"),
        (None, ""),
        (float("nan"), ""),
    ],
)
def test_clean_report(raw, cleaned):
    assert clean_report(raw) == cleaned
    assert clean_report(cleaned) == cleaned  # idempotent: cleaning twice changes nothing


def test_normalize_for_metrics_lowercases_and_drops_redactions():
    assert normalize_for_metrics("Normal chest x-XXXX. No XXXX XXXX effusion.") == "normal chest x-. no effusion."


@pytest.mark.parametrize(
    "text, findings, impression",
    [
        ("FINDINGS: Lungs clear. IMPRESSION: Normal chest.", "Lungs clear.", "Normal chest."),
        ("Findings - Lungs clear.\nImpression\n1. Normal chest.", "Lungs clear.", "Normal chest."),
        ("findings: A. conclusion: B.", "A.", "B."),
        ("Lungs clear. IMPRESSION: Normal.", "Lungs clear.", "Normal."),  # unlabelled findings
        ("COMPARISON: None. FINDINGS: Clear. IMPRESSION: Normal.", "Clear.", "Normal."),
        ("Impressions: A. Conclusion: B.", "", "A. B."),
        ("Findings are consistent with pneumonia.", "Findings are consistent with pneumonia.", ""),
        ("No acute disease.", "No acute disease.", ""),
    ],
)
def test_split_sections(text, findings, impression):
    assert split_sections(text) == (findings, impression)


def test_join_and_split_round_trip():
    assert join_sections("Lungs clear.", "Normal.") == "FINDINGS: Lungs clear. IMPRESSION: Normal."
    assert join_sections("", "Normal.") == "IMPRESSION: Normal."
    assert join_sections("Lungs clear.", "") == "FINDINGS: Lungs clear."
    for f, i in (("Lungs clear.", "Normal."), ("", "Normal."), ("Lungs clear.", "")):
        assert split_sections(join_sections(f, i)) == (f, i)


# ---------------------------------------------------------------- manifests


@pytest.fixture
def scans(tmp_path):
    for name in ("a.nii.gz", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dicom_series").mkdir()
    return tmp_path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.lstrip("\n"), encoding="utf-8")
    return path


def test_csv_manifest_fields_sections_modality_and_extra(scans):
    path = write_csv(
        scans / "m.csv",
        """
image,report,findings,impression,split,patient
a.nii.gz,"FINDINGS: Acute  hematoma. IMPRESSION: Bleed.",,,val,P1
b.png;c.png,,No effusion.,Normal chest x-XXXX.,,P2
dicom_series,"Small subdural hematoma.
No shift.",,,test,P3
""",
    )
    # Empty section cells are cut out of the report (rows 2, 4); an empty report is built from them (row 3).
    records = read_report_manifest(path)
    a, bc, d = records
    assert a.image == str(scans / "a.nii.gz") and a.modality == "ct" and a.split == "val" and a.id == "a"
    assert a.report == "FINDINGS: Acute hematoma. IMPRESSION: Bleed."
    assert (a.findings, a.impression) == ("Acute hematoma.", "Bleed.")
    assert a.source_row == 2 and a.extra == {"patient": "P1"}
    assert bc.image == [str(scans / "b.png"), str(scans / "c.png")] and bc.modality == "xray"
    assert bc.split == "train" and bc.id == "b" and bc.images == bc.image
    assert bc.report == f"FINDINGS: No effusion. IMPRESSION: Normal chest x-{DEID_TOKEN}."
    assert (d.modality, d.source_row, d.id) == ("ct", 4, "dicom_series")
    assert d.report == d.findings == "Small subdural hematoma. No shift." and d.impression == ""
    assert [r.id for r in read_report_manifest(path, split="test")] == ["dicom_series"]


def test_sections_come_from_the_report_when_there_are_no_section_columns(scans):
    path = write_csv(scans / "m.csv", 'image,report\na.nii.gz,"Findings:\nClear.\nImpression\nNormal."\n')
    (record,) = read_report_manifest(path)
    assert (record.findings, record.impression) == ("Clear.", "Normal.")


def test_jsonl_manifest_and_write_round_trip(scans):
    path = scans / "m.jsonl"
    rows = [
        {"image": "a.nii.gz", "findings": "Bleed.", "impression": "ICH.", "modality": "CT", "id": "s1", "age": 70},
        {"image": ["b.png", str(scans / "c.png")], "report": "Clear lungs.", "split": "test"},
    ]
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n", encoding="utf-8")
    records = read_report_manifest(path)
    assert [r.source_row for r in records] == [1, 3]
    assert records[0].report == "FINDINGS: Bleed. IMPRESSION: ICH." and records[0].extra == {"age": 70}
    assert records[1].modality == "xray" and records[1].findings == "Clear lungs." and records[1].impression == ""

    out = scans / "copy.jsonl"
    write_report_manifest(records, out)
    assert json.loads(out.read_text().splitlines()[0])["image"] == "a.nii.gz"  # relative to the manifest
    again = read_report_manifest(out)
    for before, after in zip(records, again):
        assert {**vars(before), "source_row": 0} == {**vars(after), "source_row": 0}
    assert [p.name for p in scans.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_write_refuses_extra_keys_that_clash_with_columns(tmp_path):
    record = ReportRecord("a.png", "r", "r", "", "xray", "train", "x", 1, {"split": "val"})
    with pytest.raises(ValueError, match="split"):
        write_report_manifest([record], tmp_path / "m.jsonl")


@pytest.mark.parametrize(
    "text, message",
    [
        ("path,report\na.nii.gz,x\n", r"line 2: expected columns 'image' and 'report'.*found \['path', 'report'\]"),
        ("image,report\n", "empty manifest"),
        ("image,report\na.nii.gz,  \n", "line 2: empty report"),
        ("image,findings,impression\na.nii.gz,,\n", "line 2: empty report"),
        ("image,report\nmissing.nii.gz,x\n", "line 2: image not found: .*missing.nii.gz"),
        ("image,report,modality\na.nii.gz,x,mri\n", "line 2: unknown modality 'mri'"),
        ("image,report,split\na.nii.gz,x,validation\n", "line 2: unknown split 'validation'"),
        ("image,report,id\na.nii.gz,x,s1\nb.png,y,s1\n", "line 3: duplicate id 's1' \\(first on line 2\\)"),
        ("image,report\na.nii.gz,x,extra\n", "line 2: 3 cells for 2 header columns"),
        ("image,report,split\na.nii.gz,x,train\n", "no rows of split 'val'; splits found: \\['train'\\]"),
    ],
)
def test_manifest_errors_name_file_row_and_problem(scans, text, message):
    path = write_csv(scans / "bad.csv", text)
    with pytest.raises(ReportManifestError, match=message) as info:
        read_report_manifest(path, split="val" if "no rows of split" in message else None)
    assert str(path) in str(info.value)


def test_missing_files_are_allowed_without_check_files(tmp_path):
    path = write_csv(tmp_path / "m.csv", "image,report\nnot_here.png,x\n")
    assert read_report_manifest(path, check_files=False)[0].image == str(tmp_path / "not_here.png")


def test_jsonl_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"image": "a.png", "report": "x"}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(ReportManifestError, match="line 2: expected a JSON object"):
        read_report_manifest(path, check_files=False)
    path.write_text('{"image": "a.png", "report": "x"\n', encoding="utf-8")
    with pytest.raises(ReportManifestError, match="line 1: not valid JSON"):
        read_report_manifest(path, check_files=False)
    with pytest.raises(ReportManifestError, match="unknown manifest format"):
        read_report_manifest(write_csv(tmp_path / "m.txt", "image,report\n"))


# ---------------------------------------------------------------- IU X-ray (real sample data)


def test_r2gen_annotation_counts_and_four_space_test_key(iu_xray):
    raw = json.loads((iu_xray / "annotation_r2gen_standard.json").read_text())
    assert "    " in raw and "test" not in raw  # the published quirk is present
    splits = read_r2gen_annotation(iu_xray / "annotation_r2gen_standard.json", iu_xray / "images")
    assert {k: len(v) for k, v in splits.items()} == {"train": 2069, "val": 296, "test": 590}
    record = splits["test"][0]
    assert (record.id, record.split, record.modality, record.source_row) == ("CXR3030_IM-1405", "test", "xray", 1)
    assert record.image == [str(iu_xray / "images" / "CXR3030_IM-1405" / n) for n in ("0.png", "1.png")]
    assert record.extra == {"image_exists": False}
    assert record.findings == record.report and record.impression == ""
    assert f"There are no {DEID_TOKEN} of a large pleural effusion." in record.report
    assert not any("XXXX" in r.report for records in splits.values() for r in records)


def test_r2gen_annotation_tolerates_a_proper_test_key_and_refuses_unknown_keys(tmp_path):
    entry = {"id": "s1", "report": "Clear.", "image_path": ["s1/0.png", "s1/1.png"], "split": "test"}
    path = tmp_path / "annotation.json"
    path.write_text(json.dumps({"train": [], "val": [], "test": [entry]}))
    assert [r.id for r in read_r2gen_annotation(path, tmp_path)["test"]] == ["s1"]
    with pytest.raises(ReportManifestError, match="missing images"):
        read_r2gen_annotation(path, tmp_path, check_files=True)
    path.write_text(json.dumps({"train": [], "dev": [entry]}))
    with pytest.raises(ReportManifestError, match="unknown split keys \\['dev'\\]"):
        read_r2gen_annotation(path, tmp_path)
    path.write_text(json.dumps({"train": [{"id": "s2", "report": "x"}]}))
    with pytest.raises(ReportManifestError, match="entry 1: missing keys \\['image_path'\\]"):
        read_r2gen_annotation(path, tmp_path)


def test_indiana_counts_skips_and_labels(indiana):
    records, skipped = indiana
    # README: 3,851 reports, 3,337 with findings, 3,820 with an impression; 25 have neither.
    assert len(skipped["no findings and no impression"]) == 25
    assert len(records) + sum(len(v) for v in skipped.values()) == 3851
    assert sum(bool(r.findings) for r in records) == 3337
    assert sum(bool(r.impression) for r in records) == 3820
    assert indiana.summary() == "3826 reports kept; 25 skipped: no findings and no impression"
    first = records[0]
    assert (first.id, first.source_row, first.extra["MeSH"], first.extra["Problems"]) == ("1", 2, "normal", "normal")
    assert first.extra["r2gen_ids"] == ["CXR1_IM-0001"] and first.extra["projections"] == ["Frontal", "Lateral"]
    second = next(r for r in records if r.id == "2")
    assert second.extra["MeSH"].split(";") == ["Cardiomegaly/borderline", "Pulmonary Artery/enlarged"]
    assert second.report.startswith("FINDINGS: Borderline cardiomegaly.")
    assert second.report.endswith("IMPRESSION: No acute pulmonary findings.")


def test_indiana_real_sectioning_and_cleaning(indiana):
    by_id = {r.id: r for r in indiana.records}
    four = by_id["4"]  # numbered impression list, missing space after a period, a redaction
    assert four.impression.startswith("Bullous emphysema and interstitial fibrosis. Probably scarring")
    assert "2." not in four.impression
    assert "left lung apex. There are streaky opacities" in four.findings
    assert f"right upper lobe, {DEID_TOKEN} scarring." in four.findings
    three = by_id["3"]  # impression only
    assert three.findings == "" and three.report.startswith("IMPRESSION: No displaced rib fractures")
    assert split_sections(four.report) == (four.findings, four.impression)


def test_indiana_views_and_local_images(iu_xray, indiana):
    frontal = read_indiana(iu_xray / "indiana_reports.csv", iu_xray / "indiana_projections.csv", iu_xray / "images")
    assert len(frontal.skipped["no Frontal image"]) == 160
    assert len(frontal.records) == 3826 - 160
    by_id = {r.id: r for r in frontal.records}
    assert by_id["1001"].image == str(iu_xray / "images" / "1001_IM-0004-1001.dcm.png")
    assert by_id["1001"].extra["image_exists"] is True
    assert by_id["1000"].extra["projections"] == ["Frontal", "Frontal"]
    both = {r.id: r for r in indiana.records}
    assert both["1001"].extra["image_exists"] is False  # its lateral view is not in the sample
    assert [Path(p).name for p in both["1000"].images][-1] == "1000_IM-0003-2001.dcm.png"  # lateral last
    with pytest.raises(ReportManifestError, match="missing images"):
        read_indiana(
            iu_xray / "indiana_reports.csv", iu_xray / "indiana_projections.csv", iu_xray / "images", check_files=True
        )


def test_indiana_refuses_csvs_without_the_expected_columns(tmp_path):
    reports = write_csv(tmp_path / "r.csv", "uid,findings\n1,x\n")
    projections = write_csv(tmp_path / "p.csv", "uid,filename,projection\n1,1.png,Frontal\n")
    with pytest.raises(ReportManifestError, match="r.csv: missing columns \\['MeSH'"):
        read_indiana(reports, projections, tmp_path)
