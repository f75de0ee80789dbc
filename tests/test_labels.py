"""label_sentences.yaml coverage and validation, dataset mappings, label-table I/O (labels.py)."""
import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_fixtures import CAMVID_NAMES
from errors import ConfigError, LabelKeyError, WeightsError
from label_spec import IGNORE, LabelSpec, dataset_label_keys, label_texts, load_label_spec
from labels import LabelTable, load_label_table, save_label_table

# The paper's 238 training labels (issue 2), as snake_case keys: the MSeg universal classes, then the
# OpenImages / Objects365 extras from chopsticks to calculator.
PAPER_LABELS = """
backpack umbrella bag tie suitcase case bird cat dog horse sheep cow elephant bear zebra giraffe animal_other microwave
radiator oven toaster storage_tank conveyor_belt sink refrigerator washer_dryer fan dishwasher toilet bathtub shower
tunnel bridge pier_wharf tent building ceiling laptop keyboard mouse remote cell_phone television floor stage banana
apple sandwich orange broccoli carrot hot_dog pizza donut cake fruit_other food_other chair_other armchair swivel_chair
stool seat couch trash_can potted_plant nightstand bed table pool_table barrel desk ottoman wardrobe crib basket
chest_of_drawers bookshelf counter_other bathroom_counter kitchen_island door light_other lamp sconce chandelier mirror
whiteboard shelf stairs escalator cabinet fireplace stove arcade_machine gravel platform playingfield railroad road snow
sidewalk_pavement runway terrain book box clock vase scissors plaything_other teddy_bear hair_dryer toothbrush painting
poster bulletin_board bottle cup wine_glass knife fork spoon bowl tray range_hood plate person rider_other bicyclist
motorcyclist paper streetlight road_barrier mailbox cctv_camera junction_box traffic_sign traffic_light fire_hydrant
parking_meter bench bike_rack billboard sky pole fence railing_banister guard_rail mountain_hill rock frisbee skis
snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket net base sculpture column
fountain awning apparel banner flag blanket curtain_other shower_curtain pillow towel rug_floormat vegetation bicycle car
autorickshaw motorcycle airplane bus train truck trailer boat_ship slow_wheeled_object river_lake sea water_other
swimming_pool waterfall wall window window_blind chopsticks musical_instrument drink wrench mule camel tap snowmobile
fish crocodile screwdriver panda pig red_panda frying_pan monkey kangaroo leopard koala lion hammer tiger camera starfish
drill rhinoceros hippopotamus turtle flashlight rabbit skull kettle fox lynx hat harbor_seal alpaca teapot glove
sea_lion printer balloon stapler calculator
""".split()

MSEG_DATASETS = ["camvid-11", "kitti-19", "voc2012", "pascal-context-60", "scannet-20", "wilddash-19", "ade20k-150",
                 "bdd", "cityscapes-19", "coco-panoptic-133", "idd-39", "mapillary-public65", "sunrgbd-37"]
MSEG_TRAIN = ["ade20k-150", "bdd", "cityscapes-19", "coco-panoptic-133", "idd-39", "mapillary-public65", "sunrgbd-37"]
NYU40 = ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture", "counter",
         "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat", "clothes", "ceiling", "books",
         "refridgerator", "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person", "night stand",
         "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure", "otherfurniture", "otherprop"]


@pytest.fixture(scope="module")
def spec() -> LabelSpec:
    return load_label_spec()


def read_names(path) -> list[str]:
    return [n for n in path.read_text().splitlines() if n]


def test_covers_paper_labels(spec):
    assert len(PAPER_LABELS) == len(set(PAPER_LABELS)) == 238
    missing = [k for k in PAPER_LABELS if k not in spec.sentences]
    assert not missing
    for key, sentence in spec.sentences.items():
        assert sentence.startswith("An image of ") and sentence.endswith("."), key
        assert sentence.count(". ") >= 1, f"{key}: needs a definition after the first sentence"


def test_mseg_names_files_map_fully(spec, shared_dir):
    lists = shared_dir / "data/mseg-lists/dataset_lists"
    for d in MSEG_DATASETS:
        names = read_names(lists / d / f"{d}_names.txt")
        keys = dataset_label_keys(spec, d, names)
        assert len(keys) == len(names) and set(spec.datasets[d]) == set(names), d


def parse_mseg_master(shared_dir) -> tuple[list[str], list[list[str]], list[str]]:
    with open(shared_dir / "data/mseg-lists/class_remapping_files/MSeg_master.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return rows[0], rows[1:], [r[rows[0].index("universal")] for r in rows[1:]]


def test_training_sets_follow_mseg_master(spec, shared_dir):
    # independent re-derivation from the MSeg table: cells are a name or a set "{a, b}"; the row is the universal class
    header, rows, universal = parse_mseg_master(shared_dir)
    for d in MSEG_TRAIN:
        col = header.index(d)
        expected = {}
        for row, uname in zip(rows, universal):
            for raw in filter(None, (x.strip() for x in row[col].strip("{}").split(","))):
                expected[raw] = IGNORE if uname == "unlabeled" else uname.replace(" ", "_")
        assert spec.datasets[d] == expected, d


def test_mseg_universal_order(spec, shared_dir):
    _, _, universal = parse_mseg_master(shared_dir)
    assert [n for n, _ in spec.mseg_universal] == universal
    keys = [k for _, k in spec.mseg_universal if k != IGNORE]
    assert keys == PAPER_LABELS[:194]  # the paper's list starts with the universal classes, in MSeg order


@pytest.mark.slow
def test_other_datasets_map_fully(spec, data_root):
    assert dataset_label_keys(spec, "camvid-segnet", CAMVID_NAMES) == [
        "sky", "building", "pole", "road", "sidewalk_pavement", "vegetation", "traffic_sign", "fence", "car", "person",
        "bicyclist"]
    # the classes as the dataset's own README lists their colours: `various = 0:0:0` (or a table row `| various | 0:0:0 |`)
    readme = (data_root / "labelmefacade" / "README.md").read_text()
    facade = re.findall(r"^\W*(\w+)\b.*\b\d+:\d+:\d+\b", readme, flags=re.M)
    assert len(facade) == 9
    keys = dict(zip(facade, dataset_label_keys(spec, "labelmefacade", facade)))
    assert keys["various"] is None and keys["pavement"] == "sidewalk_pavement" and keys["window"] == "window"
    assert None not in dataset_label_keys(spec, "nyuv2-40", NYU40)
    assert set(spec.datasets["nyuv2-40"]) == set(NYU40) | {"void"}  # void: the releases with 0 = void, 1..40
    with_void = dataset_label_keys(spec, "nyuv2-40", ["void"] + NYU40)
    assert with_void == [None] + dataset_label_keys(spec, "nyuv2-40", NYU40)


def read_tsv(path) -> list[list[str]]:
    """Rows after the header, split on tabs only: names keep their trailing spaces (Objects365 "Formula 1 ")."""
    return [line.split("\t") for line in path.read_text(encoding="utf-8").split("\n")[1:] if line]


def test_weak_sources_map_fully(spec, shared_dir):
    lists = shared_dir / "data/class-lists"
    oi = read_tsv(lists / "openimages_v6_segmentation_classes.tsv")  # [mid, display name]
    mids = [mid for mid, _ in oi]
    assert len(mids) == len(set(mids)) == 350
    assert set(spec.datasets["openimages"]) == set(mids)  # keyed by MID, nothing else in the taxonomy
    names = [name for _, name in read_tsv(lists / "objects365_v2_classes.tsv")]
    assert len(names) == len(set(names)) == 365
    assert set(spec.datasets["objects365"]) == set(names)  # exactly, trailing spaces included
    assert {"Cigar/Cigarette ", "Formula 1 ", "Table Tennis ", "Campel", "Moniter/TV"} <= set(names)
    for d in ("openimages", "objects365"):
        assert IGNORE not in spec.datasets[d].values(), d  # every class of both sources is trained on


def test_weak_sources_by_hand(spec, shared_dir):
    oi = {name: mid for mid, name in read_tsv(shared_dir / "data/class-lists/openimages_v6_segmentation_classes.tsv")}
    o = {name: spec.datasets["openimages"][mid] for name, mid in oi.items()}
    assert (o["Cattle"], o["Mouse"], o["Computer mouse"], o["Toy"], o["Tank"], o["Man"], o["Person"]) == (
        "cow", "mouse_animal", "mouse", "plaything_other", "military_tank", "man", "person")
    s = spec.datasets["objects365"]
    assert (s["Moniter/TV"], s["Trash bin Can"], s["Chair"], s["Other Shoes"], s["Barrel/bucket"], s["Campel"],
            s["Formula 1 "]) == ("tv_monitor", "trash_can", "chair", "shoe_other", "barrel_bucket", "camel", "race_car")
    # the same concept gets the same key in both sources
    for oi_name, o365_name in [("Waste container", "Trash bin Can"), ("Flying disc", "Frisbee"), ("Tap", "Faucet"),
                               ("Football", "Soccer"), ("Drill (Tool)", "Electric Drill"), ("Camel", "Campel"),
                               ("Mobile phone", "Cell Phone"), ("Tablet computer", "Tablet")]:
        assert o[oi_name] == s[o365_name], (oi_name, o365_name)


def test_paper_extra_labels_come_from_weak_sources(spec, shared_dir):
    # ssiw_label_list.tsv ids 194..237 are the paper's 44 extra labels; its README: 42 of them are OpenImages
    # segmentation class names (ignoring case and SSIW's "(which is a type of animal)" glosses)
    lists = shared_dir / "data/class-lists"
    extras = [row[1] for row in read_tsv(lists / "ssiw_label_list.tsv") if 194 <= int(row[0]) <= 237]
    words = [re.sub(r"\(which is a type of animal\)$", "", label).strip() for label in extras]
    assert [w.replace(" ", "_") for w in words] == PAPER_LABELS[194:]
    oi = {name.lower(): mid for mid, name in read_tsv(lists / "openimages_v6_segmentation_classes.tsv")}
    by_name = [w for w in words if w in oi]
    assert len(by_name) == 42 and sorted(set(words) - set(by_name)) == ["drill", "musical instrument"]
    for w in by_name:  # the OpenImages class of that name maps to that label
        assert spec.datasets["openimages"][oi[w]] == w.replace(" ", "_"), w
    assert spec.datasets["openimages"][oi["drill (tool)"]] == "drill"
    reached = set(spec.datasets["openimages"].values()) | set(spec.datasets["objects365"].values())
    assert [k for k in PAPER_LABELS[194:] if k not in reached] == ["musical_instrument"]


# The open-vocabulary benchmark suite (issue 14): configs/eval/<name>.yaml -> (class count, ignore id of its label maps)
OV_BENCHMARKS = {"ade20k-847": (847, 65535), "pascal-context-459": (459, 65535), "ade20k-150-ov": (150, 255),
                 "pascal-context-59": (59, 255), "voc-20": (20, 255)}
EVAL_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "eval"


def eval_config(name: str) -> dict:
    return yaml.safe_load((EVAL_CONFIGS / f"{name}.yaml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", OV_BENCHMARKS)
def test_ov_benchmark_configs(spec, name):
    d = eval_config(name)
    count, ignore = OV_BENCHMARKS[name]
    names = d["class_names"]
    assert d["name"] == name and d["encoding"] == "id" and d["ignore"] == [ignore]
    assert d.get("root") is None and d.get("list") is None  # the user passes --root / --list
    assert len(names) == len(set(names)) == count
    keys = dataset_label_keys(spec, d["taxonomy"], names)  # KeyError names an unmapped class
    assert None not in keys  # every class of the benchmark is evaluated
    assert len(set(keys)) == count  # one key per class: evaluate.py would merge classes that share one
    if d["taxonomy"] == name:  # a taxonomy of its own holds exactly the benchmark's classes
        assert set(spec.datasets[name]) == set(names)


def test_ov_ade847_list():
    names = eval_config("ade20k-847")["class_names"]
    # trainIds of ADE20K_SEM_SEG_FULL_CATEGORIES (Mask2Former register_ade20k_full.py), spot-checked by hand
    assert [names[i] for i in (0, 7, 11, 150, 500, 838, 846)] == [
        "wall", "bed", "person, individual, someone, somebody, mortal, soul", "blanket, cover", "cat", "sea star",
        "adding machine, totalizer, totaliser"]
    assert sum("," in n for n in names) > 200  # synonym lists kept as the benchmark spells them


def test_ov_pascal_context_lists(spec, shared_dir):
    lists = shared_dir / "data/mseg-lists/dataset_lists"
    pc460 = read_names(lists / "pascal-context-460/pascal-context-460_names.txt")
    pc459 = eval_config("pascal-context-459")["class_names"]
    assert pc460[0] == "unlabeled" and pc459 == pc460[1:]  # labels.txt order, tif id = label - 1
    pc60 = read_names(lists / "pascal-context-60/pascal-context-60_names.txt")
    pc59 = eval_config("pascal-context-59")["class_names"]
    assert pc59 == [n for n in pc60 if n != "background"]
    # detectron2 ids of PC-59 are its raw labels in ascending order, i.e. the PC-459 order
    assert [n for n in pc459 if n in set(pc59)] == pc59
    # the same 59 concepts keep their keys inside PC-459
    assert dataset_label_keys(spec, "pascal-context-459", pc59) == dataset_label_keys(spec, "pascal-context-60", pc59)
    voc = read_names(lists / "voc2012/voc2012_names.txt")
    assert eval_config("voc-20")["class_names"] == [n for n in voc if n != "background"] == voc[1:]


# ADE-150 classes whose ADE-847 class is not the one whose first synonym is the same word
ADE150_TO_847 = {"pot": "pot, flowerpot", "screen": "screen, silver screen, projection screen",
                 "crt screen": "screen, crt screen", "glass": "glass, drinking glass",
                 "washer": "washer, automatic washer, washing machine", "pier": "pier, wharf, wharfage, dock",
                 "step": "step, stair", "stairs": "stairs, steps", "basket": "basket, handbasket", "bag": "bag"}


def test_ov_ade150_list_and_keys(spec, shared_dir):
    lists = shared_dir / "data/mseg-lists/dataset_lists"
    a151 = read_names(lists / "ade20k-151/ade20k-151_names.txt")
    a150 = eval_config("ade20k-150-ov")["class_names"]
    assert a151[0] == "unlabeled" and a150 == a151[1:]  # objectInfo150 order, png id = label - 1
    # MSeg's ade20k-150 training set: the same classes, in alphabetical order
    assert sorted(a150) == read_names(lists / "ade20k-150/ade20k-150_names.txt")
    a847 = eval_config("ade20k-847")["class_names"]
    by_first = {}
    for n in a847:
        by_first.setdefault(n.split(",")[0], []).append(n)
    ov, full = spec.datasets["ade20k-150-ov"], spec.datasets["ade20k-847"]
    for n in a150:  # the same ADE annotation class gets the same key in both benchmarks
        counterpart = ADE150_TO_847.get(n) or by_first[n][0]
        assert n in ADE150_TO_847 or len(by_first[n]) == 1, n
        assert ov[n] == full[counterpart], n


def test_ov_same_concept_same_key(spec, shared_dir):
    oi = {name: mid for mid, name in read_tsv(shared_dir / "data/class-lists/openimages_v6_segmentation_classes.tsv")}
    d = spec.datasets
    same = [(d["openimages"][oi["Computer mouse"]], d["ade20k-847"]["mouse, computer mouse"],
             d["pascal-context-459"]["mouse"], d["pascal-context-60"]["mouse"]),
            (d["objects365"]["Sneakers"], d["ade20k-847"]["gym shoe, sneaker, tennis shoe"]),
            (d["objects365"]["Surveillance Camera"], d["ade20k-847"]["security camera"],
             d["pascal-context-459"]["surveillance camera"]),
            (d["openimages"][oi["Tap"]], d["objects365"]["Faucet"], d["ade20k-847"]["faucet, spigot"],
             d["pascal-context-459"]["faucet"]),
            (d["openimages"][oi["Waste container"]], d["ade20k-847"][
                "ashcan, trash can, garbage can, wastebin, ash bin, ash-bin, ashbin, dustbin, trash barrel, trash bin"],
             d["pascal-context-459"]["trash bin"]),
            (d["pascal-context-459"]["musical instrument"], "musical_instrument")]
    for keys in same:
        assert len(set(keys)) == 1, keys


def test_eval_sets_are_one_to_one(spec):
    # evaluation needs one label key per evaluated class, or two classes could not be told apart
    for d in ["camvid-11", "kitti-19", "voc2012", "pascal-context-60", "scannet-20", "wilddash-19", "camvid-segnet",
              "labelmefacade", "nyuv2-40"]:
        keys = [k for k in spec.datasets[d].values() if k != IGNORE]
        assert len(keys) == len(set(keys)), d


def test_camvid_by_hand(spec):
    c = spec.datasets["camvid-11"]
    assert (c["Column_Pole"], c["SignSymbol"], c["Sidewalk"], c["Tree"], c["Pedestrian"], c["Bicyclist"]) == (
        "pole", "traffic_sign", "sidewalk_pavement", "vegetation", "person", "bicyclist")
    assert spec.datasets["camvid-segnet"]["Pavement"] == "sidewalk_pavement"


def test_lookups(spec):
    with pytest.raises(LabelKeyError, match="camvid-11.*Lamppost"):
        dataset_label_keys(spec, "camvid-11", ["Road", "Lamppost"])
    with pytest.raises(LabelKeyError, match="no-such-set"):
        dataset_label_keys(spec, "no-such-set", ["road"])
    assert label_texts(spec, ["cell_phone", "sky"], mode="word") == ["cell phone", "sky"]
    assert label_texts(spec, ["sky"])[0].startswith("An image of the sky.")
    with pytest.raises(ConfigError, match="phrase"):
        label_texts(spec, ["sky"], mode="phrase")
    with pytest.raises(LabelKeyError, match="skyy"):
        label_texts(spec, ["skyy"], mode="word")


GOOD = """labels:
  road: "An image of a road. A paved surface for vehicles."
  sky: "An image of the sky. The space above."
datasets:
  toy:
    Road: road
    Void: ignore
"""


@pytest.mark.parametrize("text, culprit", [
    (GOOD.replace("  sky:", "  road:"), "road"),  # duplicate label key
    (GOOD + "    Road: sky\n", "Road"),  # duplicate class name inside a dataset
    (GOOD.replace('"An image of the sky. The space above."', '""'), "sky"),  # empty sentence
    (GOOD.replace('"An image of the sky. The space above."', ""), "sky"),  # missing sentence
    (GOOD.replace("Road: road", "Road: street"), "street"),  # unknown key
    (GOOD.replace('"An image of the sky.', '"A photo of the sky.'), "sky"),  # wrong prefix
    (GOOD + "extras:\n  a: b\n", "extras"),  # unknown section
])
def test_invalid_yaml_raises(tmp_path, text, culprit):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=culprit) as err:
        load_label_spec(path)
    assert str(path) in str(err.value)


def test_valid_small_yaml(tmp_path):
    path = tmp_path / "good.yaml"
    path.write_text(GOOD)
    spec = load_label_spec(path)
    assert dataset_label_keys(spec, "toy", ["Void", "Road"]) == [None, "road"]


def random_table(n=5, d=8) -> LabelTable:
    emb = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    return LabelTable([f"k{i}" for i in range(n)], [f"An image of k{i}." for i in range(n)], emb, "test")


def test_table_round_trip_and_rows(tmp_path):
    table = random_table()
    save_label_table(tmp_path / "t.pt", table)
    assert [p.name for p in tmp_path.iterdir()] == ["t.pt"]  # no temp file left behind
    back = load_label_table(tmp_path / "t.pt")
    assert back.names == table.names and back.sentences == table.sentences and back.encoder == "test"
    assert torch.equal(back.embeddings, table.embeddings) and back.embeddings.dtype == torch.float32
    assert back.rows(["k3", "k0"]).tolist() == [3, 0]
    with pytest.raises(LabelKeyError, match="missing_key"):
        back.rows(["k1", "missing_key"])


def test_table_validation(tmp_path):
    t = random_table()
    torch.save({"names": t.names, "sentences": t.sentences, "embeddings": t.embeddings * 2, "encoder": "x"},
               tmp_path / "scaled.pt")
    with pytest.raises(WeightsError, match="L2-normalised"):
        load_label_table(tmp_path / "scaled.pt")
    torch.save({"names": t.names[:4], "sentences": t.sentences, "embeddings": t.embeddings, "encoder": "x"},
               tmp_path / "short.pt")
    with pytest.raises(WeightsError, match="4 names"):
        load_label_table(tmp_path / "short.pt")
    with pytest.raises(WeightsError, match="NaN"):
        LabelTable(t.names, t.sentences, torch.full((5, 8), float("nan")), "x")


def test_cat2vec_npy(tmp_path, spec):
    arr = np.random.default_rng(0).normal(size=(194, 512)).astype(np.float32) * 3
    np.save(tmp_path / "universal_cat2vec.npy", arr)
    table = load_label_table(tmp_path / "universal_cat2vec.npy")
    assert table.names == PAPER_LABELS[:194]
    assert table.embeddings.shape == (194, 512)
    assert torch.allclose(table.embeddings.norm(dim=1), torch.ones(194), atol=1e-5)
    want = torch.from_numpy(arr[table.names.index("cell_phone")])
    assert torch.allclose(table.embeddings[table.rows(["cell_phone"])[0]], want / want.norm(), atol=1e-6)
    np.save(tmp_path / "bad.npy", arr[:100])
    with pytest.raises(WeightsError, match="MSeg universal"):
        load_label_table(tmp_path / "bad.npy")


def test_one_rule_for_a_label_list():
    """A flag's list (parse_labels) and a request's (serve_http.label_list, both servers') are judged by
    label_list_problem alone: the same list gets the same reason, ConfigError naming the flag for one, a 400 naming the
    field for the other."""
    import serve_http
    from label_spec import label_list_problem, parse_labels
    assert parse_labels(" sky, road ", "--labels") == ["sky", "road"]
    for labels, reason in [(["sky", " "], "label 2 of 2 is blank"), (["sky", "road", " sky"], "['sky'] asked more "
                           "than once"), (["a\ud800"], "not valid Unicode")]:
        assert reason in label_list_problem(labels)
        with pytest.raises(ConfigError, match=re.escape(f"--labels={','.join(labels)!r}: {label_list_problem(labels)}")):
            parse_labels(",".join(labels), "--labels")
        with pytest.raises(serve_http.HttpError, match=re.escape(f"labels: {label_list_problem(labels)}")) as e:
            serve_http.label_list({"labels": labels}, "labels", 10)
        assert e.value.status == 400
    assert label_list_problem(["a", "b", "c"], max_labels=2) == "3 labels, more than 2 (the ids of a 16-bit PNG)"
    assert label_list_problem([f"l{i}" for i in range(65536)]).startswith("65536 labels, more than 65535")


def test_the_four_inference_scripts_share_one_label_source():
    """evaluate, predict, export and serve take the label source's settings from label_source.LabelSource, with its
    defaults and its check of --mode."""
    from dataclasses import fields

    import evaluate
    import export
    import predict
    import serve
    from label_source import LabelSource
    from settings import parse_settings
    want = {f.name: f.default for f in fields(LabelSource)}
    assert set(want) == {"checkpoint", "embeddings", "clip_weights", "mode"}
    for cls in (evaluate.EvalSettings, predict.PredictSettings, export.ExportSettings, serve.ServeSettings):
        assert issubclass(cls, LabelSource), cls
        assert {f.name: f.default for f in fields(cls) if f.name in want} == want, cls
        with pytest.raises(ConfigError, match="mode"):
            parse_settings(cls, ["--mode=words"])
