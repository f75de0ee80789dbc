"""indexes.py and index_format.Index: the streaming JSON reader (json_stream.py) against json.load, both index kinds on
small files in the public layouts (Objects365 V2 JSON, OpenImages V6 CSVs), bad input (a box outside its image, an
unknown category, a missing mask, a truncated index) and the real list of OpenImages' 350 segmentation classes."""
import csv
import json
import mmap
import pickle

import numpy as np
import pytest

import data
import indexes
import json_stream
from data_fixtures import (OPENIMAGES_HEADER, SPEC, TABLE, build_openimages_index, o365_name, write_coco_boxes,
                           write_openimages)
from errors import DataError
from index_format import Index


# ---- streaming JSON --------------------------------------------------------------------------------------------------

def members_by_json_load(path):
    """What json_array_items must yield, from the whole document parsed at once."""
    doc = json.loads(path.read_text())
    return [(key, item) for key, value in doc.items() if isinstance(value, list) for item in value]


def test_json_array_items_equal_json_load_at_any_chunk_size(tmp_path, monkeypatch):
    runs = []
    monkeypatch.setattr(json_stream, "_decode_run", lambda text: runs.append(json.loads("[" + text + "]")) or runs[-1])
    doc = {"info": {"year": 2020, "nested": [1, {"a": "]}"}]}, "images": [{"id": 1, "file_name": "a \"b\" ]}.jpg"},
                                                                     {"id": 22, "file_name": "\u00e9\u4e2d}.jpg"}],
           "empty": [], "annotations": [{"bbox": [1.5e-3, 123456.789, -0.0, 1e10], "id": 123456789012,
                                         "x": {"nested": "}"}}] * 20,
           "version": 12345, "categories": [{"id": 1, "name": "Formula 1 "}], "flag": None, "last": [0.25]}
    for indent in (None, 2):
        path = tmp_path / f"doc{indent}.json"
        path.write_text(json.dumps(doc, indent=indent, ensure_ascii=indent is None))
        want = members_by_json_load(path)
        for chunk in (1, 2, 3, 7, 64, 150, 333, 1000, 1 << 20):  # cuts every number, string and object somewhere
            runs.clear()
            assert list(json_stream.json_array_items(path, chunk)) == want, (indent, chunk)
            if chunk == 1000:
                assert sum(len(r) > 1 for r in runs) > 0, (indent, chunk)  # runs of items decoded at once


@pytest.mark.parametrize("text, where", [('{"images": [{"id": 1}, {"id": 2]}', "Expecting ',' delimiter"),
                                         ('{"images": [{"id": 1} {"id": 2}]}', "expected one of"),
                                         ('{"images": [{"id": 1}]', "expected one of"),
                                         ('{"images": [{"id": 1}]} extra', "data after the end"),
                                         ('[1, 2]', "expected one of")])
def test_json_array_items_bad_json_names_the_file(tmp_path, text, where):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(DataError, match=rf"bad.json: not valid JSON at character \d+: .*{where}"):
        list(json_stream.json_array_items(path, 4))


# ---- coco_boxes ------------------------------------------------------------------------------------------------------

def write_o365(root, annotations, categories=None, image_files=True):
    """Objects365 V2 layout: zhiyuan_objv2_train.json and images under train/patchN/ (mmdetection's layout)."""
    images = [{"height": 40, "id": 11, "license": 1, "width": 60, "file_name": o365_name(11), "url": ""},
              {"height": 30, "id": 5, "license": 1, "width": 20, "file_name": o365_name(5), "url": ""},
              {"height": 50, "id": 8, "license": 1, "width": 50, "file_name": o365_name(8), "url": ""}]
    categories = categories or [{"name": "Cigar/Cigarette ", "id": 197}, {"name": "Person", "id": 1},
                                {"name": "Moniter/TV", "id": 38}]
    coco = {"images": images, "annotations": [dict(iscrowd=0, isfake=0, isreflected=0, area=1.0, **a)
                                              for a in annotations],
            "categories": categories, "licenses": [{"name": "x", "id": 1, "url": ""}]}
    (root / "zhiyuan_objv2_train.json").write_text(json.dumps(coco))
    if image_files:
        for image in images:
            path = root / "train" / "/".join(image["file_name"].split("/")[-2:])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"jpeg")  # the index checks that files exist, it does not decode them
    return root / "zhiyuan_objv2_train.json"


def build(root, **kw):
    return indexes.build_coco_boxes(root / "zhiyuan_objv2_train.json", root / "train", root / "index", **kw)


def test_coco_index_groups_boxes_by_image_in_annotation_order(tmp_path):
    write_o365(tmp_path, [dict(id=1, image_id=8, category_id=1, bbox=[1, 2, 3, 4]),
                          dict(id=2, image_id=11, category_id=38, bbox=[10, 10, 5, 5]),
                          dict(id=3, image_id=8, category_id=197, bbox=[0.5, 0.25, 10, 20]),
                          dict(id=4, image_id=11, category_id=1, bbox=[0, 0, 60, 40])])
    index = build(tmp_path)
    assert index.meta["class_names"] == ["Cigar/Cigarette ", "Person", "Moniter/TV"]  # exact, in the JSON's order
    assert index.meta["image_layout"].startswith("patch folder")
    names = index.strings("image_names")
    assert [names[i] for i in range(3)] == [f"patch{i}/objects365_v1_{i:08d}.jpg" for i in (11, 5, 8)]
    a = index.arrays
    assert a["box_offsets"].tolist() == [0, 2, 2, 4]  # image 11: ann 2, 4; image 5: none; image 8: ann 1, 3
    assert a["boxes"].tolist() == [[10, 10, 15, 15], [0, 0, 60, 40], [1, 2, 4, 6], [0.5, 0.25, 10.5, 20.25]]
    assert a["box_classes"].tolist() == [2, 1, 1, 0]  # class id = position in categories, not the category id
    assert a["image_sizes"].tolist() == [[60, 40], [20, 30], [50, 50]]
    assert all(isinstance(a[f].base, mmap.mmap) and not a[f].flags.writeable for f in a)  # mapped, read-only
    assert index.meta["counts"] == {"image_name_bytes": len(a["image_names"]), "images": 3, "boxes": 4}
    assert index.meta["sources"]["json"]["bytes"] == (tmp_path / "zhiyuan_objv2_train.json").stat().st_size
    again = pickle.loads(pickle.dumps(index))  # what a spawned DataLoader worker receives: the folder, mapped again
    assert again.arrays["boxes"].tolist() == a["boxes"].tolist() and len(pickle.dumps(index)) < 2000


def test_coco_index_file_names_as_in_the_json(tmp_path):
    targets = write_coco_boxes(tmp_path, layout="json")  # train/images/v1/patchN/...
    index = Index(tmp_path / "index", "coco_boxes")
    assert index.meta["image_layout"] == "as in the JSON" and len(targets) == 3
    assert index.strings("image_names")[0] == o365_name(7)


def test_boxes_outside_the_image_are_clipped_or_dropped_and_counted(tmp_path):
    write_o365(tmp_path, [dict(id=1, image_id=5, category_id=1, bbox=[-3, 25, 10, 10]),  # sticks out: clipped
                          dict(id=2, image_id=5, category_id=1, bbox=[25, 5, 4, 4]),  # right of the 20-px image
                          dict(id=3, image_id=5, category_id=1, bbox=[2, 2, 0, 5]),  # no width
                          dict(id=4, image_id=5, category_id=1, bbox=[2, 2, 3, 3])])
    index = build(tmp_path)
    assert index.arrays["boxes"].tolist() == [[0, 25, 7, 30], [2, 2, 5, 5]]
    check = index.meta["check"]
    assert check["boxes_clipped_to_image"] == 1 and check["boxes_without_area_dropped"] == 2
    assert check["first_dropped_box_ids"] == [2, 3]


def test_unknown_category_or_image_and_malformed_boxes_name_the_annotation(tmp_path):
    write_o365(tmp_path, [dict(id=1, image_id=5, category_id=1, bbox=[1, 1, 2, 2]),
                          dict(id=77, image_id=5, category_id=366, bbox=[1, 1, 2, 2])])
    with pytest.raises(DataError, match=r"zhiyuan_objv2_train.json: annotation 77 refers to unknown category_id 366"):
        build(tmp_path)
    write_o365(tmp_path, [dict(id=78, image_id=6, category_id=1, bbox=[1, 1, 2, 2])])
    with pytest.raises(DataError, match=r"annotation 78 refers to unknown image_id 6"):
        build(tmp_path)
    write_o365(tmp_path, [dict(id=79, image_id=5, category_id=1, bbox=[1, 1, 2])])
    with pytest.raises(DataError, match=r"annotations\[0\] \(id 79\): not enough values"):
        build(tmp_path)
    write_o365(tmp_path, [dict(id=80, image_id=5, category_id=1)])
    with pytest.raises(DataError, match=r"annotations\[0\] \(id 80\): no 'bbox'"):
        build(tmp_path)
    write_o365(tmp_path, [], categories=[{"name": "a", "id": 1}, {"name": "b", "id": 1}])
    with pytest.raises(DataError, match=r"category id 1 appears more than once"):
        build(tmp_path)
    (tmp_path / "zhiyuan_objv2_train.json").write_text('{"images": [], "annotations": []}')
    with pytest.raises(DataError, match=r"not a COCO detection JSON \(no 'categories' array\)"):
        build(tmp_path)
    assert not (tmp_path / "index").exists() and not list(tmp_path.glob(".index*"))


def test_missing_images_raise_or_are_left_out_with_their_boxes(tmp_path):
    write_o365(tmp_path, [dict(id=1, image_id=11, category_id=1, bbox=[1, 1, 2, 2]),
                          dict(id=2, image_id=5, category_id=1, bbox=[1, 1, 2, 2]),
                          dict(id=3, image_id=8, category_id=38, bbox=[1, 1, 3, 3])])
    (tmp_path / "train" / "patch5" / "objects365_v1_00000005.jpg").unlink()
    with pytest.raises(DataError, match=r"1 of 3 images do not exist:\n  .*train/patch5/objects365_v1_00000005.jpg"):
        build(tmp_path)
    index = build(tmp_path, skip_missing=True)
    names = index.strings("image_names")
    assert [names[i] for i in range(len(index))] == ["patch11/objects365_v1_00000011.jpg",
                                                     "patch8/objects365_v1_00000008.jpg"]
    assert index.arrays["box_offsets"].tolist() == [0, 1, 2] and index.arrays["box_classes"].tolist() == [1, 2]
    assert index.meta["check"]["images_missing"] == 1 and index.meta["check"]["boxes_of_missing_images"] == 1
    assert (tmp_path / "index/missing.txt").read_text().endswith("train/patch5/objects365_v1_00000005.jpg\n")


def test_an_existing_index_is_replaced_only_when_asked(tmp_path):
    write_o365(tmp_path, [dict(id=1, image_id=11, category_id=1, bbox=[1, 1, 2, 2])])
    first = build(tmp_path).meta["build"]
    with pytest.raises(FileExistsError, match="--overwrite"):
        build(tmp_path)
    assert build(tmp_path, overwrite=True).meta["build"] != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index", "train", "zhiyuan_objv2_train.json"]


# ---- a damaged index -------------------------------------------------------------------------------------------------

def test_truncated_or_inconsistent_index_names_folder_and_field(tmp_path):
    write_o365(tmp_path, [dict(id=i, image_id=8, category_id=1, bbox=[1, 1, 2, 2]) for i in range(50)])
    build(tmp_path)
    folder = tmp_path / "index"
    boxes = (folder / "boxes.npy").read_bytes()
    for cut in (boxes[:-100], boxes[:60]):  # a copy cut short, in the data or in the header
        (folder / "boxes.npy").write_bytes(cut)
        with pytest.raises(DataError, match=r"index: field boxes \(boxes.npy\) is missing, truncated or unreadabl"):
            Index(folder, "coco_boxes")
    np.save(folder / "boxes.npy", np.zeros((49, 4), np.float32))  # whole, but not the size index.json says
    with pytest.raises(DataError, match=r"index: field boxes is float32 \(49, 4\), index.json says float32 \(50, 4\)"):
        Index(folder, "coco_boxes")
    (folder / "boxes.npy").write_bytes(boxes)
    offsets = np.load(folder / "box_offsets.npy")
    np.save(folder / "box_offsets.npy", offsets[::-1].copy())
    with pytest.raises(DataError, match=r"index: field box_offsets does not run from 0 to 50"):
        Index(folder, "coco_boxes")
    np.save(folder / "box_offsets.npy", offsets)
    Index(folder, "coco_boxes")  # whole again
    with pytest.raises(DataError, match=r"index.json: a 'coco_boxes' index .* expected 'openimages'"):
        Index(folder, "openimages")
    (folder / "index.json").unlink()
    with pytest.raises(DataError, match=r"index: not an index folder \(no index.json\); build it with"):
        Index(folder, "coco_boxes")


# ---- openimages ------------------------------------------------------------------------------------------------------

def test_openimages_index_by_mid(tmp_path):
    write_openimages(tmp_path)
    index = Index(tmp_path / "index", "openimages")
    assert index.meta["class_names"] == ["/m/0k4j", "/m/01g317", "/m/07j7r"]
    assert index.meta["display_names"] == ["Car", "Person", "Tree"]
    ids, masks = index.strings("image_names"), index.strings("mask_names")
    assert [ids[i] for i in range(2)] == ["a1", "b2"]
    assert index.arrays["mask_offsets"].tolist() == [0, 3, 4]
    assert [masks[j] for j in range(4)] == ["a1_m0k4j_0001.png", "a1_m01g317_0002.png", "a1_m07j7r_0003.png",
                                            "b2_m01g317_0004.png"]  # CSV order within an image
    assert index.arrays["mask_classes"].tolist() == [0, 1, 2, 1]


def test_openimages_masks_in_one_folder_per_first_character(tmp_path):
    expected = write_openimages(tmp_path, index=False)
    for mask in list((tmp_path / "masks").iterdir()):
        (tmp_path / "masks" / mask.name[0]).mkdir(exist_ok=True)
        mask.rename(tmp_path / "masks" / mask.name[0] / mask.name)
    index = build_openimages_index(tmp_path)
    assert index.meta["mask_layout"] == "one folder per first character"
    cfg = data.SourceConfig.from_dict(dict(name="oi", root=str(tmp_path), encoding="openimages", kind="coarse",
                                           taxonomy="toy-oi", index="index", images="images", masks="masks"))
    assert np.array_equal(data.MultiSourceDataset([cfg], SPEC, TABLE)[0]["target"].numpy(), expected["a1"])


def test_openimages_unknown_mid_and_bad_csv(tmp_path):
    write_openimages(tmp_path, index=False)
    csv_path = tmp_path / "train-annotations-object-segmentation.csv"
    rows = list(csv.reader(csv_path.open()))
    with open(csv_path, "a", newline="") as f:
        csv.writer(f).writerow(["c3_m0xyz_0005.png", "c3", "/m/0xyz", "0005", "0", "1", "0", "1", "0.8", ""])
    with pytest.raises(DataError, match=rf"object-segmentation.csv:{len(rows) + 1}: LabelName /m/0xyz is not a class"):
        build_openimages_index(tmp_path)
    csv_path.write_text("ImageID,LabelName\nx,/m/0k4j\n")
    with pytest.raises(DataError, match=r"header \['ImageID', 'LabelName'\] lacks MaskPath"):
        build_openimages_index(tmp_path)
    (tmp_path / "classes-segmentation.txt").write_text("/m/0k4j\n\n/m/01g317\n")
    with pytest.raises(DataError, match=r"classes-segmentation.txt:2: expected one distinct MID a line"):
        build_openimages_index(tmp_path)


def test_openimages_missing_mask_drops_its_image(tmp_path):
    write_openimages(tmp_path, index=False)
    (tmp_path / "masks" / "a1_m07j7r_0003.png").unlink()
    with pytest.raises(DataError, match=r"1 of 4 masks do not exist:\n  .*masks/a1_m07j7r_0003.png\n\(--skip_missing"):
        build_openimages_index(tmp_path)
    index = build_openimages_index(tmp_path, skip_missing=True)
    assert index.strings("image_names")[0] == "b2" and len(index) == 1  # a1 without one of its masks: left out
    check = index.meta["check"]
    assert (check["masks_missing"], check["images_dropped"], check["masks_dropped"]) == (1, 1, 3)


def test_openimages_vanished_mask_is_a_data_error_at_load(tmp_path):
    write_openimages(tmp_path)
    (tmp_path / "masks" / "b2_m01g317_0004.png").unlink()
    cfg = data.SourceConfig.from_dict(dict(name="oi", root=str(tmp_path), encoding="openimages", kind="coarse",
                                           taxonomy="toy-oi", index="index", images="images", masks="masks"))
    with pytest.raises(DataError, match=r"masks/b2_m01g317_0004.png: file not found"):
        data.MultiSourceDataset([cfg], SPEC, TABLE)[1]
    sample = data.MultiSourceDataset([cfg], SPEC, TABLE, skip_bad=True)[(0, 1, 0, 0)]
    assert sample["key"] == (0, 0) and "b2_m01g317_0004.png" in sample["skipped"][0]


def test_real_openimages_classes(tmp_path, shared_dir):
    """Google's 350 segmentation MIDs (classes-segmentation.txt format, written from the shared list) index a CSV
    that uses two of them; class ids are line numbers of that list."""
    rows = list(csv.reader((shared_dir / "data/class-lists/openimages_v6_segmentation_classes.tsv").open(),
                           delimiter="\t"))[1:]
    mids = [mid for mid, _ in rows]
    assert len(mids) == 350 == len(set(mids))
    (tmp_path / "classes-segmentation.txt").write_text("\n".join(mids) + "\n")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "0a.jpg").write_bytes(b"x")
    with open(tmp_path / "masks.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(OPENIMAGES_HEADER)
        for k, mid in enumerate([mids[349], mids[0], mids[349]]):
            name = f"0a_{mid.replace('/', '')}_{k:08x}.png"
            (tmp_path / "masks" / name).write_bytes(b"x")
            w.writerow([name, "0a", mid, f"{k:08x}", "0.1", "0.9", "0.2", "0.8", "0.85", "0.5 0.5 1"])
    index = indexes.build_openimages(tmp_path / "masks.csv", tmp_path / "classes-segmentation.txt",
                                     tmp_path / "images", tmp_path / "masks", tmp_path / "index")
    assert index.meta["class_names"] == mids and index.arrays["mask_classes"].tolist() == [349, 0, 349]


def test_command_line(tmp_path, capsys):
    write_openimages(tmp_path, index=False)
    indexes.main(["openimages", "--csv", str(tmp_path / "train-annotations-object-segmentation.csv"),
                  "--classes", str(tmp_path / "classes-segmentation.txt"), "--images", str(tmp_path / "images"),
                  "--masks", str(tmp_path / "masks"), "--out", str(tmp_path / "oi-index")])
    assert "wrote" in capsys.readouterr().out and len(Index(tmp_path / "oi-index", "openimages")) == 2
    write_o365(tmp_path, [dict(id=1, image_id=11, category_id=1, bbox=[1, 1, 2, 2])])
    indexes.main(["coco_boxes", "--json", str(tmp_path / "zhiyuan_objv2_train.json"), "--images",
                  str(tmp_path / "train"), "--out", str(tmp_path / "o365-index")])
    assert Index(tmp_path / "o365-index", "coco_boxes").meta["counts"]["boxes"] == 1
