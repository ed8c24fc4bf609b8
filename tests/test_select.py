"""cxr.data.select: label files in each public dataset's real format, written here, with a few images missing on
disk."""

import csv
import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from cxr.data.select import (
    SelectedImage,
    SelectionError,
    main,
    select_images,
    write_file_list,
)
from cxr.data.select_labels import CHEXPERT_LABEL_COLUMNS

# ------------------------------------------------------------------ helpers


def write_csv(path: Path, header: list[str], rows: list[list[str]], *, raw_header: str | None = None) -> Path:
    """A CSV label file; `raw_header` writes the header line verbatim (NIH's is not valid quoted CSV)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as handle:
        if raw_header is not None:
            handle.write(raw_header + "\n")
        else:
            csv.writer(handle).writerow(header)
        csv.writer(handle).writerows(rows)
    return path


def touch(root: Path, relpath: str) -> None:
    """A tiny stand-in image file (select never decodes images)."""
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG stand-in")


def read_list(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return reader.fieldnames, list(reader)


def as_tuples(rows) -> list[tuple[str, str, str]]:
    return [(row.path, row.patient_id, row.view) for row in rows]


# ------------------------------------------------------------------ NIH ChestX-ray14

# Data_Entry_2017.csv as released: the header's bracketed names contain unquoted commas and end with a comma.
NIH_HEADER_2017 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],"
)
NIH_HEADER_2020 = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)


def nih_row(name, findings, patient, view, trailing=True):
    row = [name, findings, name[9:12].lstrip("0") or "0", patient, "58", "M", view, "2682", "2749", "0.143", "0.143"]
    return row + [""] if trailing else row


@pytest.fixture
def nih(tmp_path):
    root = tmp_path / "nih"
    labels = write_csv(
        tmp_path / "Data_Entry_2017.csv",
        [],
        [
            nih_row("00000001_000.png", "Cardiomegaly", "1", "PA"),
            nih_row("00000001_001.png", "No Finding", "1", "PA"),
            nih_row("00000002_000.png", "No Finding", "2", "AP"),
            nih_row("00000003_000.png", "No Finding", "3", "PA"),  # not on disk
            nih_row("00000004_000.png", "No Finding", "4", "PA"),
            nih_row("00000004_001.png", "Effusion|Infiltration", "4", "PA"),
            nih_row("00000005_000.png", "No Finding", "5", "PA"),
        ],
        raw_header=NIH_HEADER_2017,
    )
    for relpath in (
        "images_001/images/00000001_000.png",
        "images_001/images/00000001_001.png",
        "images_001/images/00000002_000.png",
        "images_002/images/00000004_000.png",
        "images_002/images/00000004_001.png",
        "images_002/images/00000005_000.png",
    ):
        touch(root, relpath)
    return labels, root


def test_nih_selects_normal_pa_on_disk(nih, capsys):
    labels, root = nih
    result = select_images("nih", labels, root)
    assert as_tuples(result.rows) == [
        ("images_001/images/00000001_001.png", "1", "PA"),
        ("images_002/images/00000004_000.png", "4", "PA"),
        ("images_002/images/00000005_000.png", "5", "PA"),
    ]
    assert all(row.source == "nih" for row in result.rows)
    assert result.counts == {"rows": 7, "normal": 5, "view": 4, "on_disk": 3, "patients": 3}
    assert result.missing == ["00000003_000.png"]
    printed = capsys.readouterr().out
    assert 'Finding Labels == "No Finding"' in printed and "00000003_000.png" in printed
    for count in ("7", "5", "4", "3"):
        assert any(line.split()[-1] == count for line in printed.splitlines()[1:])


def test_nih_views_widen_to_ap(nih):
    labels, root = nih
    result = select_images("nih", labels, root, views="PA,AP", verbose=False)
    assert ("images_001/images/00000002_000.png", "2", "AP") in as_tuples(result.rows)
    assert result.counts["view"] == 5 and result.counts["on_disk"] == 4 and result.counts["patients"] == 4


def test_nih_2020_header_and_several_files(tmp_path):
    root = tmp_path / "nih"
    first = write_csv(
        tmp_path / "a.csv",
        [],
        [nih_row("00000010_000.png", "No Finding", "10", "PA", trailing=False)],
        raw_header=NIH_HEADER_2020,
    )
    second = write_csv(
        tmp_path / "b.csv",
        [],
        [nih_row("00000011_000.png", "No Finding", "11", "PA", trailing=False)],
        raw_header=NIH_HEADER_2020,
    )
    touch(root, "00000010_000.png")
    touch(root, "deep/er/00000011_000.png")
    result = select_images("nih", [first, second], root, verbose=False)
    assert as_tuples(result.rows) == [("00000010_000.png", "10", "PA"), ("deep/er/00000011_000.png", "11", "PA")]
    with pytest.raises(SelectionError, match=r"00000010_000.png is listed twice"):
        select_images("nih", [first, first], root, verbose=False)


def test_nih_errors_name_file_line_and_column(tmp_path, nih):
    _, root = nih
    bad_view = write_csv(
        tmp_path / "v.csv",
        [],
        [nih_row("00000001_001.png", "No Finding", "1", "PA"), nih_row("00000002_000.png", "No Finding", "2", "LL")],
        raw_header=NIH_HEADER_2017,
    )
    with pytest.raises(SelectionError, match=r"v\.csv, line 3, column 'View Position': unexpected value 'LL'"):
        select_images("nih", bad_view, root, verbose=False)
    bad_label = write_csv(
        tmp_path / "l.csv", [], [nih_row("00000001_001.png", "No finding", "1", "PA")], raw_header=NIH_HEADER_2017
    )
    with pytest.raises(SelectionError, match=r"l\.csv, line 2, column 'Finding Labels': unexpected value 'No finding'"):
        select_images("nih", bad_label, root, verbose=False)
    mixed = write_csv(
        tmp_path / "m.csv", [], [nih_row("00000001_001.png", "No Finding|Mass", "1", "PA")], raw_header=NIH_HEADER_2017
    )
    with pytest.raises(SelectionError, match=r"'No Finding\|Mass'"):
        select_images("nih", mixed, root, verbose=False)
    no_view = write_csv(
        tmp_path / "c.csv", ["Image Index", "Finding Labels", "Patient ID"], [["x.png", "No Finding", "1"]]
    )
    with pytest.raises(
        SelectionError,
        match=r"c\.csv: missing column\(s\) \['View Position'\].*"
        r"columns found: \['Image Index', 'Finding Labels', 'Patient ID'\]",
    ):
        select_images("nih", no_view, root, verbose=False)


def test_nih_duplicate_file_on_disk_is_an_error(nih):
    labels, root = nih
    touch(root, "images_009/images/00000005_000.png")
    with pytest.raises(SelectionError, match=r"00000005_000.png is present more than once.*images_002.*images_009"):
        select_images("nih", labels, root, verbose=False)


def test_hidden_copies_and_symlinked_folders_are_not_duplicates(nih):
    labels, root = nih
    touch(root, ".Trash/00000005_000.png")
    touch(root, "images_002/images/.00000004_000.png")
    (root / "all_images").symlink_to(root / "images_002", target_is_directory=True)
    result = select_images("nih", labels, root, verbose=False)
    assert [row.path for row in result.rows] == [
        "all_images/images/00000004_000.png",
        "all_images/images/00000005_000.png",
        "images_001/images/00000001_001.png",
    ]


def test_wrong_images_root_says_so(nih, tmp_path):
    labels, _ = nih
    (tmp_path / "empty").mkdir()
    with pytest.raises(SelectionError, match=r"none of the 4 selected images was found under .*empty.*--images_root"):
        select_images("nih", labels, tmp_path / "empty", verbose=False)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"is empty: expected a CSV file with a header row"),
        ("\n\n", r"is empty"),
        (NIH_HEADER_2017 + "\n", r"has a header but no rows"),
    ],
)
def test_empty_label_files(tmp_path, content, message):
    path = tmp_path / "Data_Entry_2017.csv"
    path.write_text(content)
    with pytest.raises(SelectionError, match=message):
        select_images("nih", path, tmp_path, verbose=False)


def test_binary_and_misnamed_files(tmp_path):
    zipped = tmp_path / "Data_Entry_2017.csv"
    zipped.write_bytes(b"PK\x03\x04\x14\x00\x00\x00\x08\x00\xff\xfe\x80")
    with pytest.raises(SelectionError, match=r"Data_Entry_2017\.csv cannot be read as a UTF-8 CSV file"):
        select_images("nih", zipped, tmp_path, verbose=False)
    not_gzip = write_csv(tmp_path / "labels.csv", ["a"], [["1"]]).rename(tmp_path / "labels.csv.gz")
    with pytest.raises(SelectionError, match=r"labels\.csv\.gz cannot be read .*BadGzipFile"):
        select_images("mimic", [not_gzip, zipped], tmp_path, verbose=False)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(
        (NIH_HEADER_2017 + "\n").encode() + "00000001_000.png,No Finding,0,1,58,M,PA,\xe9\n".encode("latin-1")
    )
    with pytest.raises(SelectionError, match=r"latin1\.csv cannot be read as a UTF-8 CSV file .*UnicodeDecodeError"):
        select_images("nih", latin1, tmp_path, verbose=False)
    good_rows = "".join(",".join(nih_row(f"{i:08d}_000.png", "Mass", str(i), "PA")) + "\n" for i in range(1000))
    latin1.write_bytes((NIH_HEADER_2017 + "\n" + good_rows).encode() + "x.png,\xe9\n".encode("latin-1"))
    with pytest.raises(SelectionError, match=r"latin1\.csv cannot be read as a UTF-8 CSV file .*UnicodeDecodeError"):
        select_images("nih", latin1, tmp_path, verbose=False)  # past the header's read buffer


def test_short_row_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(NIH_HEADER_2017 + "\n00000001_000.png,No Finding,0,1\n")
    with pytest.raises(
        SelectionError, match=r"d\.csv, line 2: row has 4 fields, so column\(s\) \['View Position'\] are missing"
    ):
        select_images("nih", path, tmp_path, verbose=False)


# ------------------------------------------------------------------ CheXpert

CHEXPERT_HEADER = [
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]


def chexpert_row(path, orientation, view, no_finding, **others):
    labels = {name: "" for name in CHEXPERT_HEADER[5:]}
    labels["No Finding"] = no_finding
    labels.update({name.replace("_", " "): value for name, value in others.items()})
    assert set(labels) == set(CHEXPERT_HEADER[5:])
    return [path, "Female", "68", orientation, view, *labels.values()]


def test_chexpert_header_matches_module():
    assert set(CHEXPERT_HEADER[5:]) == set(CHEXPERT_LABEL_COLUMNS)


@pytest.fixture
def chexpert(tmp_path):
    root = tmp_path / "chexpert"
    prefix = "CheXpert-v1.0-small/train/"
    train = write_csv(
        tmp_path / "train.csv",
        CHEXPERT_HEADER,
        [
            chexpert_row(prefix + "patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "1.0"),
            chexpert_row(prefix + "patient00001/study1/view2_lateral.jpg", "Lateral", "", "1.0"),
            chexpert_row(prefix + "patient00002/study1/view1_frontal.jpg", "Frontal", "AP", "1.0"),
            chexpert_row(prefix + "patient00003/study1/view1_frontal.jpg", "Frontal", "PA", "", Cardiomegaly="1.0"),
            chexpert_row(prefix + "patient00004/study1/view1_frontal.jpg", "Frontal", "PA", "-1.0"),
            chexpert_row(
                prefix + "patient00005/study2/view1_frontal.jpg", "Frontal", "PA", "1.0", Support_Devices="1.0"
            ),
            chexpert_row(prefix + "patient00006/study1/view1_frontal.jpg", "Frontal", "PA", "1.0", Edema="1.0"),
            chexpert_row(prefix + "patient00007/study1/view1_frontal.jpg", "Frontal", "PA", "1.0"),  # not on disk
            chexpert_row(prefix + "patient00008/study1/view1_frontal.jpg", "Frontal", "PA", "0.0", Fracture="-1.0"),
        ],
    )
    valid = write_csv(
        tmp_path / "valid.csv",
        CHEXPERT_HEADER,
        [
            chexpert_row(
                "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
                "Frontal",
                "PA",
                "1.0",
                Cardiomegaly="0.0",
            ),
        ],
    )
    for patient in ("00001", "00002", "00003", "00004", "00005", "00006", "00008"):
        touch(root, f"{prefix}patient{patient}/study1/view1_frontal.jpg")
    touch(root, prefix + "patient00001/study1/view2_lateral.jpg")
    touch(root, prefix + "patient00005/study2/view1_frontal.jpg")
    touch(root, "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg")
    return [train, valid], root


def test_chexpert_selects_normal_frontal_pa(chexpert, capsys):
    labels, root = chexpert
    result = select_images("chexpert", labels, root)
    assert as_tuples(result.rows) == [
        ("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "patient00001", "PA"),
        ("CheXpert-v1.0-small/train/patient00005/study2/view1_frontal.jpg", "patient00005", "PA"),
        ("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "patient64541", "PA"),
    ]
    assert result.counts == {
        "rows": 10,
        "normal": 7,
        "consistent": 6,
        "frontal": 5,
        "view": 4,
        "on_disk": 3,
        "patients": 3,
    }
    printed = capsys.readouterr().out
    assert "No Finding == 1.0 (blank and -1.0 excluded)" in printed
    assert "patient00007/study1/view1_frontal.jpg" in printed


def test_chexpert_root_may_be_the_archive_folder(chexpert):
    labels, root = chexpert
    result = select_images("chexpert", labels, root / "CheXpert-v1.0-small", views=["PA", "AP"], verbose=False)
    assert [row.path for row in result.rows] == [
        "train/patient00001/study1/view1_frontal.jpg",
        "train/patient00002/study1/view1_frontal.jpg",
        "train/patient00005/study2/view1_frontal.jpg",
        "valid/patient64541/study1/view1_frontal.jpg",
    ]
    assert [row.view for row in result.rows] == ["PA", "AP", "PA", "PA"]


def test_chexpert_exclude_support_devices(chexpert):
    labels, root = chexpert
    result = select_images("chexpert", labels, root, exclude_support_devices=True, verbose=False)
    assert [row.patient_id for row in result.rows] == ["patient00001", "patient64541"]
    assert result.counts["no_support_devices"] == 5
    with pytest.raises(SelectionError, match="chexpert and mimic only"):
        select_images("nih", labels, root, exclude_support_devices=True, verbose=False)


@pytest.mark.parametrize(
    "column, value",
    [
        ("No Finding", "2.0"),
        ("No Finding", "yes"),
        ("Edema", "nan"),
        ("Frontal/Lateral", "frontal"),
        ("AP/PA", "OBLIQUE"),
    ],
)
def test_chexpert_unexpected_values(tmp_path, column, value):
    row = chexpert_row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal", "PA", "1.0")
    row[CHEXPERT_HEADER.index(column)] = value
    labels = write_csv(tmp_path / "train.csv", CHEXPERT_HEADER, [row])
    with pytest.raises(SelectionError, match=rf"train\.csv, line 2, column '{column}': unexpected value '{value}'"):
        select_images("chexpert", labels, tmp_path, verbose=False)


def test_chexpert_integer_style_labels(tmp_path):
    """ "1"/"0" mean the same as "1.0"/"0.0"; a positive pathology next to No Finding makes the row contradictory."""
    path = "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"
    touch(tmp_path, path)
    labels = write_csv(tmp_path / "valid.csv", CHEXPERT_HEADER, [chexpert_row(path, "Frontal", "PA", "1", Edema="0")])
    assert [row.path for row in select_images("chexpert", labels, tmp_path, verbose=False).rows] == [path]
    labels = write_csv(tmp_path / "valid.csv", CHEXPERT_HEADER, [chexpert_row(path, "Frontal", "PA", "1", Edema="1")])
    with pytest.raises(SelectionError, match="no images left after the step 'consistent'"):
        select_images("chexpert", labels, tmp_path, verbose=False)


def test_chexpert_missing_label_column(tmp_path):
    header = [name for name in CHEXPERT_HEADER if name != "Pleural Other"]
    labels = write_csv(
        tmp_path / "train.csv", header, [["x/patient00001/s/v.jpg", "F", "1", "Frontal", "PA"] + [""] * 13]
    )
    with pytest.raises(SelectionError, match=r"missing column\(s\) \['Pleural Other'\]"):
        select_images("chexpert", labels, tmp_path, verbose=False)


# ------------------------------------------------------------------ MIMIC-CXR-JPG

MIMIC_LABEL_HEADER = [
    "subject_id",
    "study_id",
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
]
MIMIC_METADATA_HEADER = [
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
]


def mimic_label_row(subject, study, no_finding, **others):
    values = {name: "" for name in MIMIC_LABEL_HEADER[2:]}
    values["No Finding"] = no_finding
    values.update(others)
    return [subject, study, *values.values()]


def mimic_image_row(dicom, subject, study, view):
    return [
        dicom,
        subject,
        study,
        "CHEST (PA AND LAT)",
        view,
        "3056",
        "2544",
        "21800506",
        "213014.531",
        "CHEST (PA AND LAT)",
        "postero-anterior",
        "Erect",
    ]


D = [
    "02aa804e-bde0afdd-112c0b34-7bc16630-4e384014",
    "174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962",
    "2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab",
    "68b5c4b1-227d0485-9cc38c3f-7b84ab51-4b472714",
    "fffabebf-74fd3a1f-673b6b41-96ec0ac9-2ab69818",
    "9d8eb4e9-1f7c0f2d-6a0c9b3e-5e0b2b1a-0c3d4e5f",
    "a917c883-720a5bbf-02c84fc6-98ad00ac-c562ff80",
    "b0a2c1d3-e4f5a6b7-c8d9e0f1-a2b3c4d5-e6f7a8b9",
]


@pytest.fixture
def mimic(tmp_path):
    root = tmp_path / "mimic-cxr-jpg"
    labels = write_csv(
        tmp_path / "mimic-cxr-2.0.0-chexpert.csv.gz",
        MIMIC_LABEL_HEADER,
        [
            mimic_label_row("10000032", "50414267", "1.0"),
            mimic_label_row("10000032", "53189527", "", Cardiomegaly="1.0"),
            mimic_label_row("10000764", "57375967", "1.0"),
            mimic_label_row("10000898", "50771383", "1.0", **{"Support Devices": "1.0"}),
            mimic_label_row("10001176", "53186264", "1.0", Edema="-1.0"),
        ],
    )
    metadata = write_csv(
        tmp_path / "mimic-cxr-2.0.0-metadata.csv.gz",
        MIMIC_METADATA_HEADER,
        [
            mimic_image_row(D[0], "10000032", "50414267", "PA"),
            mimic_image_row(D[1], "10000032", "50414267", "LATERAL"),
            mimic_image_row(D[2], "10000032", "53189527", "PA"),
            mimic_image_row(D[3], "10000764", "57375967", "AP"),
            mimic_image_row(D[4], "10000764", "57375967", "PA"),  # not on disk
            mimic_image_row(D[5], "10000898", "50771383", "PA"),
            mimic_image_row(D[6], "10000898", "50771383", ""),
            mimic_image_row(D[7], "10001176", "53186264", "PA"),
        ],
    )
    for dicom, subject, study in [
        (D[0], "10000032", "50414267"),
        (D[1], "10000032", "50414267"),
        (D[2], "10000032", "53189527"),
        (D[3], "10000764", "57375967"),
        (D[5], "10000898", "50771383"),
        (D[7], "10001176", "53186264"),
    ]:
        touch(root, f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg")
    return [metadata, labels], root  # metadata first: files are told apart by their columns


def test_mimic_join_selects_normal_pa(mimic, capsys):
    labels, root = mimic
    result = select_images("mimic", labels, root)
    assert as_tuples(result.rows) == [
        (f"files/p10/p10000032/s50414267/{D[0]}.jpg", "10000032", "PA"),
        (f"files/p10/p10000898/s50771383/{D[5]}.jpg", "10000898", "PA"),
    ]
    assert result.counts == {
        "rows": 5,
        "normal": 4,
        "consistent": 3,
        "images": 6,
        "view": 3,
        "on_disk": 2,
        "patients": 2,
    }
    assert result.missing == [f"files/p10/p10000764/s57375967/{D[4]}.jpg"]
    assert "ViewPosition in ['PA']" in capsys.readouterr().out


def test_mimic_views_and_support_devices(mimic):
    labels, root = mimic
    result = select_images("mimic", labels, root / "files", views="AP,PA", exclude_support_devices=True, verbose=False)
    assert as_tuples(result.rows) == [
        (f"p10/p10000032/s50414267/{D[0]}.jpg", "10000032", "PA"),
        (f"p10/p10000764/s57375967/{D[3]}.jpg", "10000764", "AP"),
    ]


def test_mimic_no_check_files_lists_what_to_download(mimic, tmp_path, capsys):
    labels, _ = mimic
    (tmp_path / "nothing_yet").mkdir()
    out = tmp_path / "wanted.csv"
    assert (
        main(
            [
                "--source",
                "mimic",
                "--labels",
                *map(str, labels),
                "--images_root",
                str(tmp_path / "nothing_yet"),
                "--out",
                str(out),
                "--no-check_files",
            ]
        )
        == 0
    )
    assert [row["path"] for row in read_list(out)[1]] == [
        f"files/p10/p10000032/s50414267/{D[0]}.jpg",
        f"files/p10/p10000764/s57375967/{D[4]}.jpg",
        f"files/p10/p10000898/s50771383/{D[5]}.jpg",
    ]
    printed = capsys.readouterr().out
    assert "found on disk" not in printed and "the disk was not checked" in printed
    with pytest.raises(SelectionError, match="check_files=False needs a source whose labels give the path"):
        select_images("vindr", labels, tmp_path, check_files=False, verbose=False)


def test_mimic_file_errors(mimic, tmp_path):
    (metadata, labels), root = mimic
    with pytest.raises(SelectionError, match=r"needs exactly two --labels files"):
        select_images("mimic", [labels], root, verbose=False)
    bad = write_csv(
        tmp_path / "meta.csv", MIMIC_METADATA_HEADER, [mimic_image_row(D[0], "10000032", "50414267", "OBLIQUE")]
    )
    with pytest.raises(SelectionError, match=r"meta\.csv, line 2, column 'ViewPosition': unexpected value 'OBLIQUE'"):
        select_images("mimic", [labels, bad], root, verbose=False)
    other = write_csv(tmp_path / "split.csv", ["subject_id", "study_id", "split"], [["1", "2", "train"]])
    with pytest.raises(
        SelectionError, match=r"split\.csv: neither .*columns found: \['subject_id', 'study_id', 'split'\]"
    ):
        select_images("mimic", [labels, other], root, verbose=False)
    bad_id = write_csv(tmp_path / "l.csv", MIMIC_LABEL_HEADER, [mimic_label_row("s10000032", "50414267", "1.0")])
    with pytest.raises(SelectionError, match=r"l\.csv, line 2, column 'subject_id': unexpected value 's10000032'"):
        select_images("mimic", [bad_id, metadata], root, verbose=False)


# ------------------------------------------------------------------ VinDr-CXR

VINDR_KAGGLE_HEADER = ["image_id", "class_name", "class_id", "rad_id", "x_min", "y_min", "x_max", "y_max"]
IDS = [
    "000434271f63a053c4128a0ba6352c7f",
    "00053190460d56c53cc3e57321387478",
    "0005e8e3701dfb1dd93d53e2ff537b6e",
    "0006e0a85696f6bb578e84fafa9a5607",
    "0007d316f756b3fa0baea2ff514ce945",
]


def vindr_rows(image_id, classes):
    rows = []
    for rad, name in enumerate(classes, start=8):
        if name == "No finding":
            rows.append([image_id, name, "14", f"R{rad}", "", "", "", ""])
        else:
            rows.append([image_id, name, "3", f"R{rad}", "691.0", "1375.0", "1653.0", "1831.0"])
    return rows


@pytest.fixture
def vindr(tmp_path):
    root = tmp_path / "vinbigdata"
    normal3 = ["No finding"] * 3
    labels = write_csv(
        tmp_path / "train.csv",
        VINDR_KAGGLE_HEADER,
        vindr_rows(IDS[0], normal3)
        + vindr_rows(IDS[1], ["No finding", "No finding", "Cardiomegaly"])
        + vindr_rows(IDS[2], normal3)
        + vindr_rows(IDS[4], ["Cardiomegaly", "Aortic enlargement"])
        + vindr_rows(IDS[3], normal3),
    )
    for image_id in (IDS[0], IDS[1], IDS[3], IDS[4]):  # IDS[2] not on disk
        touch(root, f"train/{image_id}.dicom")
    return labels, root


def test_vindr_every_radiologist_must_say_no_finding(vindr, capsys):
    labels, root = vindr
    result = select_images("vindr", labels, root)
    assert as_tuples(result.rows) == [(f"train/{IDS[0]}.dicom", IDS[0], "PA"), (f"train/{IDS[3]}.dicom", IDS[3], "PA")]
    assert result.counts == {"rows": 14, "images": 5, "normal": 3, "view": 3, "on_disk": 2, "patients": 2}
    assert 'every row of the image says "No finding" and nothing else' in capsys.readouterr().out
    with pytest.raises(SelectionError, match=r"no images left after the step 'view'"):
        select_images("vindr", labels, root, views="AP", verbose=False)


def test_vindr_physionet_annotations_format(tmp_path):
    root = tmp_path / "vindr"
    header = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"]
    labels = write_csv(
        tmp_path / "annotations_train.csv",
        header,
        [
            [IDS[0], "R1", "No finding", "", "", "", ""],
            [IDS[0], "R2", "No finding", "", "", "", ""],
            [IDS[1], "R1", "No finding", "", "", "", ""],
            [IDS[1], "R2", "Lung Opacity", "1", "2", "3", "4"],
        ],
    )
    touch(root, f"train/{IDS[0]}.dicom")
    touch(root, f"train/{IDS[1]}.dicom")
    assert as_tuples(select_images("vindr", labels, root, verbose=False).rows) == [
        (f"train/{IDS[0]}.dicom", IDS[0], "PA")
    ]


def test_vindr_errors(tmp_path, vindr):
    _, root = vindr
    wrong_case = write_csv(
        tmp_path / "a.csv", VINDR_KAGGLE_HEADER, [[IDS[0], "No Finding", "14", "R1", "", "", "", ""]]
    )
    with pytest.raises(SelectionError, match=r"a\.csv, line 2, column 'class_name': unexpected value 'No Finding'"):
        select_images("vindr", wrong_case, root, verbose=False)
    mismatch = write_csv(tmp_path / "b.csv", VINDR_KAGGLE_HEADER, [[IDS[0], "No finding", "3", "R1", "", "", "", ""]])
    with pytest.raises(SelectionError, match=r"b\.csv, line 2: class_name 'No finding' does not match class_id '3'"):
        select_images("vindr", mismatch, root, verbose=False)
    no_class = write_csv(tmp_path / "c.csv", ["image_id", "rad_id"], [[IDS[0], "R1"]])
    with pytest.raises(
        SelectionError,
        match=r"c\.csv: neither a VinDr-CXR box annotation file .*columns found: \['image_id', 'rad_id'\]",
    ):
        select_images("vindr", no_class, root, verbose=False)
    bad_label = write_csv(
        tmp_path / "d.csv",
        VINDR_IMAGE_LABEL_HEADER,
        [image_label_row(IDS[0], "R1"), image_label_row(IDS[0], "R2", Tuberculosis="yes")],
    )
    with pytest.raises(SelectionError, match=r"d\.csv, line 3, column 'Tuberculosis': unexpected value 'yes'"):
        select_images("vindr", bad_label, root, verbose=False)


# PhysioNet annotations/image_labels_train.csv: one row per radiologist, 0/1 per local and global label.
VINDR_IMAGE_LABEL_HEADER = [
    "image_id",
    "rad_id",
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Clavicle fracture",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Enlarged PA",
    "ILD",
    "Infiltration",
    "Lung Opacity",
    "Lung cavity",
    "Lung cyst",
    "Mediastinal shift",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Pulmonary fibrosis",
    "Rib fracture",
    "Other lesion",
    "COPD",
    "Lung tumor",
    "Pneumonia",
    "Tuberculosis",
    "Other diseases",
    "No finding",
]


def image_label_row(image_id, rad_id, **marked):
    values = {name: "0" for name in VINDR_IMAGE_LABEL_HEADER[2:]}
    values.update({name.replace("_", " "): value for name, value in marked.items()})
    if not marked:
        values["No finding"] = "1"
    assert len(values) == len(VINDR_IMAGE_LABEL_HEADER) - 2
    return [image_id, rad_id, *values.values()]


def test_vindr_image_labels_catch_global_diagnoses(tmp_path):
    """An image whose boxes all say "No finding" is still abnormal when a radiologist marked a global label."""
    root = tmp_path / "vindr"
    boxes = write_csv(
        tmp_path / "annotations_train.csv",
        ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max"],
        [[image_id, f"R{r}", "No finding", "", "", "", ""] for image_id in IDS[:4] for r in (1, 2, 3)],
    )
    image_labels = write_csv(
        tmp_path / "image_labels_train.csv",
        VINDR_IMAGE_LABEL_HEADER,
        [
            image_label_row(IDS[0], "R1"),
            image_label_row(IDS[0], "R2"),
            image_label_row(IDS[0], "R3"),
            image_label_row(IDS[1], "R1"),
            image_label_row(IDS[1], "R2", Tuberculosis="1"),
            image_label_row(IDS[1], "R3"),
            image_label_row(IDS[2], "R1"),
            image_label_row(IDS[2], "R2", **{"No finding": "1", "Other diseases": "1"}),
            image_label_row(IDS[3], "R1"),
            image_label_row(IDS[3], "R2", **{"No finding": ""}),
        ],
    )
    for image_id in IDS[:4]:
        touch(root, f"train/{image_id}.dicom")
    assert [r.patient_id for r in select_images("vindr", boxes, root, verbose=False).rows] == IDS[:4]
    result = select_images("vindr", [boxes, image_labels], root, verbose=False)
    assert [r.patient_id for r in result.rows] == [IDS[0]]
    assert result.counts == {"rows": 22, "images": 4, "normal": 1, "view": 1, "on_disk": 1, "patients": 1}
    assert [r.patient_id for r in select_images("vindr", image_labels, root, verbose=False).rows] == [IDS[0]]


# ------------------------------------------------------------------ PadChest

# The columns of PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv, after an unnamed first (row index) column.
PADCHEST_HEADER = [
    "",
    "ImageID",
    "ImageDir",
    "StudyDate_DICOM",
    "StudyID",
    "PatientID",
    "PatientBirth",
    "PatientSex_DICOM",
    "ViewPosition_DICOM",
    "Projection",
    "MethodProjection",
    "Pediatric",
    "Modality_DICOM",
    "Manufacturer_DICOM",
    "PhotometricInterpretation_DICOM",
    "PixelRepresentation_DICOM",
    "PixelAspectRatio_DICOM",
    "SpatialResolution_DICOM",
    "BitsStored_DICOM",
    "WindowCenter_DICOM",
    "WindowWidth_DICOM",
    "Rows_DICOM",
    "Columns_DICOM",
    "XRayTubeCurrent_DICOM",
    "Exposure_DICOM",
    "ExposureInuAs_DICOM",
    "ExposureTime",
    "RelativeXRayExposure_DICOM",
    "ReportID",
    "Report",
    "MethodLabel",
    "Labels",
    "Localizations",
    "LabelsLocalizationsBySentence",
    "labelCUIS",
    "LocalizationsCUIS",
]
PC = [f"2168401113669640{n:02d}_00-0{n:02d}-1{n:02d}.png" for n in range(12)]


def padchest_row(number, image_id, folder, patient, projection, labels, method="Physician", report="sin hallazgos"):
    values = dict.fromkeys(PADCHEST_HEADER, "")
    values.update(
        {
            "": str(number),
            "ImageID": image_id,
            "ImageDir": folder,
            "StudyDate_DICOM": "20140404",
            "StudyID": f"study{number}",
            "PatientID": patient,
            "PatientBirth": "1950.0",
            "PatientSex_DICOM": "F",
            "ViewPosition_DICOM": "POSTEROANTERIOR" if projection == "PA" else "",
            "Projection": projection,
            "MethodProjection": "Manual review of DICOM fields",
            "Pediatric": "No",
            "Modality_DICOM": "CR",
            "ReportID": str(4000000 + number),
            "Report": report,
            "MethodLabel": method,
            "Labels": labels,
            "Localizations": "[]",
            "LabelsLocalizationsBySentence": f"[{labels}]" if labels else "",
            "labelCUIS": "[]",
            "LocalizationsCUIS": "[]",
        }
    )
    return list(values.values())


@pytest.fixture
def padchest(tmp_path):
    root = tmp_path / "padchest"
    rows = [
        padchest_row(0, PC[0], "0", "p1", "PA", "['normal']"),
        padchest_row(1, PC[1], "0", "p1", "L", "['normal']"),  # the lateral of the same study
        padchest_row(2, PC[2], "1", "p2", "PA", "['normal']", method="RNN_model"),
        padchest_row(3, PC[3], "1", "p3", "AP", "['normal']"),
        padchest_row(4, PC[4], "2", "p4", "AP_horizontal", "['normal']", method="RNN_model"),
        padchest_row(5, PC[5], "2", "p5", "PA", "['normal', 'cardiomegaly']"),  # a quoted cell with a comma
        padchest_row(6, PC[6], "2", "p6", "PA", ""),  # no labels: not the same as normal
        padchest_row(7, PC[7], "3", "p7", "PA", "[' normal', '']"),  # spaces and blank entries, as in the release
        padchest_row(8, PC[8], "3", "p8", "PA", "['normal']"),  # not on disk
        padchest_row(9, PC[9], "3", "p9", "PA", "[]"),
        padchest_row(10, PC[10], "4", "p1", "PA", "['normal']", report='cardiomediastino normal,\n"sin" cambios'),
        padchest_row(11, PC[11], "4", "p10", "PA", "['exclude']"),
    ]
    labels = write_csv(tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", PADCHEST_HEADER, rows)
    for row in rows:
        image_id, folder = row[1], row[2]
        if image_id == PC[10]:
            touch(root, image_id)  # the numbered folders merged into one: found at the root
        elif image_id != PC[8]:
            touch(root, f"{folder}/{image_id}")
    return labels, root


def test_padchest_labels_cell_is_a_quoted_python_list(padchest):
    labels, _ = padchest
    text = labels.read_text()
    assert "\"['normal', 'cardiomegaly']\"" in text and ",['normal']," in text  # csv quoting, as pandas writes it
    with open(labels, newline="") as handle:
        assert sum(1 for _ in handle) > 13  # a report with a line break spans two lines


def test_padchest_selects_exactly_normal_pa(padchest, capsys):
    labels, root = padchest
    result = select_images("padchest", labels, root)
    assert as_tuples(result.rows) == [
        (f"0/{PC[0]}", "p1", "PA"),
        (f"1/{PC[2]}", "p2", "PA"),
        (PC[10], "p1", "PA"),  # sorted by path
        (f"3/{PC[7]}", "p7", "PA"),
    ]
    assert all(row.source == "padchest" for row in result.rows)
    assert result.counts == {"rows": 12, "normal": 8, "view": 5, "on_disk": 4, "patients": 3}
    assert result.missing == [f"3/{PC[8]}"]
    printed = capsys.readouterr().out
    assert "Labels is exactly ['normal']" in printed and "Projection in ['PA']" in printed


def test_padchest_views_and_physician_labels(padchest):
    labels, root = padchest
    every = select_images("padchest", labels, root, views="pa,AP,ap_horizontal", verbose=False)
    assert [(r.patient_id, r.view) for r in every.rows] == [
        ("p1", "PA"),
        ("p2", "PA"),
        ("p3", "AP"),
        ("p4", "AP_horizontal"),
        ("p1", "PA"),
        ("p7", "PA"),
    ]
    physician = select_images("padchest", labels, root, views="PA,AP,AP_horizontal", physician_labels_only=True)
    assert [r.patient_id for r in physician.rows] == ["p1", "p3", "p1", "p7"]
    assert physician.counts == {"rows": 12, "normal": 8, "physician": 6, "view": 5, "on_disk": 4, "patients": 3}


def test_padchest_errors(padchest, tmp_path):
    _, root = padchest
    for cell, shown in (
        ("['normal'", r"\"\['normal'\""),
        ("normal", "'normal'"),
        ("[1, 2]", r"'\[1, 2\]'"),
        (f"__import__('pathlib').Path('{tmp_path / 'pwned'}').touch()", r'"__import__'),
    ):
        bad = write_csv(tmp_path / "bad.csv", PADCHEST_HEADER, [padchest_row(0, PC[0], "0", "p1", "PA", cell)])
        with pytest.raises(SelectionError, match=rf"bad\.csv, line 2, column 'Labels': unexpected value {shown}"):
            select_images("padchest", bad, root, verbose=False)
    assert not (tmp_path / "pwned").exists()  # the cell was parsed, never run
    method = write_csv(tmp_path / "m.csv", PADCHEST_HEADER, [padchest_row(0, PC[0], "0", "p1", "PA", "[]", "Doctor")])
    with pytest.raises(SelectionError, match=r"m\.csv, line 2, column 'MethodLabel': unexpected value 'Doctor'"):
        select_images("padchest", method, root, verbose=False)
    twice = write_csv(
        tmp_path / "t.csv",
        PADCHEST_HEADER,
        [padchest_row(0, PC[0], "0", "p1", "PA", "[]"), padchest_row(1, PC[0], "0", "p1", "PA", "[]")],
    )
    with pytest.raises(SelectionError, match=rf"t\.csv, line 3: image {PC[0]} is listed twice"):
        select_images("padchest", twice, root, verbose=False)
    nih_file = write_csv(
        tmp_path / "n.csv", [], [nih_row("00000001_000.png", "No Finding", "1", "PA")], raw_header=NIH_HEADER_2017
    )
    with pytest.raises(SelectionError, match=r"n\.csv: missing column\(s\) \['ImageID', 'ImageDir'"):
        select_images("padchest", nih_file, root, verbose=False)


def test_padchest_flags(padchest, nih, tmp_path, capsys):
    labels, root = padchest
    gz = tmp_path / "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz"
    with open(labels, "rb") as source, gzip.open(gz, "wb") as target:
        target.write(source.read())
    out = tmp_path / "padchest.csv"
    argv = ["--source", "padchest", "--labels", str(gz), "--images_root", str(root), "--out", str(out)]
    assert main([*argv, "--views", "AP_horizontal", "--physician_labels_only"]) == 1  # p4 is RNN-labelled
    assert "no images left after the step 'view'" in capsys.readouterr().err
    assert main([*argv, "--views", "AP_horizontal"]) == 0
    assert read_list(out)[1] == [
        {"path": f"2/{PC[4]}", "patient_id": "p4", "view": "AP_horizontal", "source": "padchest"}
    ]
    assert main([*argv, "--no-check_files"]) == 0  # the label file gives the path: the list to download
    assert len(read_list(out)[1]) == 5

    nih_labels, nih_root = nih
    nih_argv = ["--source", "nih", "--labels", str(nih_labels), "--images_root", str(nih_root), "--out", str(out)]
    with pytest.raises(SystemExit):
        main([*nih_argv, "--views", "PA,AP_horizontal"])
    assert "--views: ['AP_horizontal'] not allowed (AP_horizontal: --source padchest only)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*nih_argv, "--physician_labels_only"])
    assert "--physician_labels_only: applies to --source padchest only" in capsys.readouterr().err
    with pytest.raises(SelectionError, match="physician_labels_only applies to padchest only"):
        select_images("nih", nih_labels, nih_root, physician_labels_only=True, verbose=False)


# ------------------------------------------------------------------ output file and CLI


def test_write_file_list_round_trip(tmp_path):
    rows = [SelectedImage("a/b c.png", "1", "PA", "nih"), SelectedImage('d,"e".png', "2", "AP", "nih")]
    out = write_file_list(rows, tmp_path / "lists" / "out.csv")
    assert out.read_text().splitlines()[0] == "path,patient_id,view,source"
    assert read_list(out)[1] == [
        {"path": "a/b c.png", "patient_id": "1", "view": "PA", "source": "nih"},
        {"path": 'd,"e".png', "patient_id": "2", "view": "AP", "source": "nih"},
    ]
    absolute = write_file_list(rows, tmp_path / "abs.csv", absolute_root=tmp_path)
    assert read_list(absolute)[1][0]["path"] == (tmp_path.resolve() / "a/b c.png").as_posix()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abs.csv", "lists"]  # no temp files left


def test_cli_main_writes_list(chexpert, tmp_path, capsys):
    labels, root = chexpert
    out = tmp_path / "list.csv"
    assert (
        main(
            [
                "--source",
                "chexpert",
                "--labels",
                *map(str, labels),
                "--images_root",
                str(root),
                "--out",
                str(out),
                "--views",
                "PA,AP",
            ]
        )
        == 0
    )
    columns, rows = read_list(out)
    assert columns == ["path", "patient_id", "view", "source"]
    assert [(r["patient_id"], r["view"], r["source"]) for r in rows] == [
        ("patient00001", "PA", "chexpert"),
        ("patient00002", "AP", "chexpert"),
        ("patient00005", "PA", "chexpert"),
        ("patient64541", "PA", "chexpert"),
    ]
    assert all((root / r["path"]).is_file() for r in rows)
    printed = capsys.readouterr().out
    assert f"wrote 4 images of 4 patients to {out}" in printed and "--file_list" in printed


def test_cli_errors(nih, tmp_path, capsys):
    labels, root = nih
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "nih", "--labels", str(labels), "--images_root", str(root)])
    assert exit_info.value.code == 2 and "--out: is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            ["--source", "nih", "--labels", str(labels), "--images_root", str(root), "--out", "x.csv", "--views", "LL"]
        )
    assert "--views: ['LL'] not allowed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--source", "nih", "--labels", str(tmp_path / "nope.csv"), "--images_root", str(root), "--out", "x.csv"])
    assert "--labels: file" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(
            ["--source", "nih", "--labels", str(labels), "--images_root", str(empty), "--out", str(tmp_path / "y.csv")]
        )
        == 1
    )
    assert "cxr.data.select: error: none of the 4 selected images" in capsys.readouterr().err
    assert not (tmp_path / "y.csv").exists()


def test_python_m_cxr_select(vindr, tmp_path):
    labels, root = vindr
    out = tmp_path / "vindr.csv"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cxr.data.select",
            "--source",
            "vindr",
            "--labels",
            str(labels),
            "--images_root",
            str(root),
            "--out",
            str(out),
            "--absolute_paths",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [r["path"] for r in read_list(out)[1]] == [
        (root.resolve() / f"train/{i}.dicom").as_posix() for i in (IDS[0], IDS[3])
    ]
    assert "found on disk under --images_root" in done.stdout


def test_file_list_is_read_by_scan_dataset(tmp_path):
    """The written list trains on exactly the selected files, with their patient ids (cxr.data.dataset reads it)."""
    from cxr.data.dataset import scan_dataset
    from cxr.data.phantoms import write_phantoms

    root = tmp_path / "nih"
    names = ["00000001_001.png", "00000004_000.png", "00000005_000.png", "00000004_001.png"]
    folders = ["images_001/images", "images_002/images", "images_002/images", "images_002/images"]
    for phantom, name, folder in zip(write_phantoms(tmp_path / "phantoms", len(names), seed=3), names, folders):
        (root / folder).mkdir(parents=True, exist_ok=True)
        phantom.rename(root / folder / name)
    labels = write_csv(
        tmp_path / "Data_Entry_2017.csv",
        [],
        [
            nih_row("00000001_001.png", "No Finding", "1", "PA"),
            nih_row("00000003_000.png", "No Finding", "3", "PA"),  # not on disk
            nih_row("00000004_000.png", "No Finding", "4", "PA"),
            nih_row("00000004_001.png", "Effusion", "4", "PA"),  # on disk, not normal: must not be trained on
            nih_row("00000005_000.png", "No Finding", "5", "PA"),
        ],
        raw_header=NIH_HEADER_2017,
    )
    result = select_images("nih", labels, root, verbose=False)
    out = write_file_list(result.rows, tmp_path / "list.csv")

    records = scan_dataset(root, file_list=out, min_image_size=64)
    assert [(r.relpath, r.patient_id) for r in records] == [
        ("images_001/images/00000001_001.png", "1"),
        ("images_002/images/00000004_000.png", "4"),
        ("images_002/images/00000005_000.png", "5"),
    ]
    assert all(r.path == root / r.relpath for r in records)


def test_a_truncated_csv_gz_is_an_error_naming_the_file(mimic, tmp_path, capsys):
    (metadata, labels), root = mimic
    cut = tmp_path / "cut" / labels.name
    cut.parent.mkdir()
    cut.write_bytes(labels.read_bytes()[:-20])  # the end of the gzip stream is missing
    argv = ["--source", "mimic", "--labels", str(metadata), str(cut), "--images_root", str(root)]
    assert main([*argv, "--out", str(tmp_path / "list.csv")]) == 1
    err = capsys.readouterr().err
    assert f"{cut} cannot be read" in err and "Traceback" not in err
    assert not (tmp_path / "list.csv").exists()


@pytest.mark.parametrize("case", ["a folder", "under a file"])
def test_out_is_checked_before_the_label_files_are_read(nih, tmp_path, monkeypatch, capsys, case):
    import cxr.data.select as select_module

    labels, root = nih
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    out = tmp_path if case == "a folder" else blocker / "list.csv"
    monkeypatch.setattr(select_module, "select_images", lambda *a, **k: pytest.fail("the labels were read"))
    with pytest.raises(SystemExit) as exit_info:
        main(["--source", "nih", "--labels", str(labels), "--images_root", str(root), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--out: " in err and "Traceback" not in err
    assert blocker.read_text() == "mine"


def test_a_full_disk_is_one_line_and_keeps_the_earlier_list(nih, tmp_path, monkeypatch, capsys):
    import builtins
    import errno

    labels, root = nih
    out = tmp_path / "list.csv"
    out.write_text("path\nearlier.png\n")
    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):
        if "w" in mode and str(file).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    assert main(["--source", "nih", "--labels", str(labels), "--images_root", str(root), "--out", str(out)]) == 1
    assert f"--out: cannot write {out} (No space left on device)" in capsys.readouterr().err
    assert out.read_text() == "path\nearlier.png\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "Data_Entry_2017.csv",
        "list.csv",
        "nih",
    ]
