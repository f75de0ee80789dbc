"""Write tests/fixtures/tokenizer_reference.json: token ids from an independent CLIP tokenizer.

The reference is OpenAI's clip/simple_tokenizer.py as shipped in the `clip-anytorch` wheel (pip install
clip-anytorch), loaded by file path because `import clip` pulls in torchvision. Its `tokenize` lives in clip/clip.py
beside torchvision imports, so `reference_tokenize` below restates those few lines.

    python tests/make_tokenizer_fixture.py
"""
import hashlib
import importlib.util
import json
import random
from pathlib import Path

import ftfy

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "tokenizer_reference.json"

# The paper's 238 training labels (issue 2), used as words and in label-like sentences.
LABELS_238 = """backpack, umbrella, bag, tie, suitcase, case, bird, cat, dog, horse, sheep, cow, elephant, bear,
zebra, giraffe, animal other, microwave, radiator, oven, toaster, storage tank, conveyor belt, sink, refrigerator,
washer dryer, fan, dishwasher, toilet, bathtub, shower, tunnel, bridge, pier wharf, tent, building, ceiling, laptop,
keyboard, mouse, remote, cell phone, television, floor, stage, banana, apple, sandwich, orange, broccoli, carrot, hot
dog, pizza, donut, cake, fruit other, food other, chair other, armchair, swivel chair, stool, seat, couch, trash can,
potted plant, nightstand, bed, table, pool table, barrel, desk, ottoman, wardrobe, crib, basket, chest of drawers,
bookshelf, counter other, bathroom counter, kitchen island, door, light other, lamp, sconce, chandelier, mirror,
whiteboard, shelf, stairs, escalator, cabinet, fireplace, stove, arcade machine, gravel, platform, playingfield,
railroad, road, snow, sidewalk pavement, runway, terrain, book, box, clock, vase, scissors, plaything other, teddy
bear, hair dryer, toothbrush, painting, poster, bulletin board, bottle, cup, wine glass, knife, fork, spoon, bowl,
tray, range hood, plate, person, rider other, bicyclist, motorcyclist, paper, streetlight, road barrier, mailbox, cctv
camera, junction box, traffic sign, traffic light, fire hydrant, parking meter, bench, bike rack, billboard, sky,
pole, fence, railing banister, guard rail, mountain hill, rock, frisbee, skis, snowboard, sports ball, kite, baseball
bat, baseball glove, skateboard, surfboard, tennis racket, net, base, sculpture, column, fountain, awning, apparel,
banner, flag, blanket, curtain other, shower curtain, pillow, towel, rug floormat, vegetation, bicycle, car,
autorickshaw, motorcycle, airplane, bus, train, truck, trailer, boat ship, slow wheeled object, river lake, sea, water
other, swimming pool, waterfall, wall, window, window blind, chopsticks, musical instrument, drink, wrench, mule,
camel, tap, snowmobile, fish, crocodile, screwdriver, panda, pig, red panda, frying pan, monkey, kangaroo, leopard,
koala, lion, hammer, tiger, camera, starfish, drill, rhinoceros, hippopotamus, turtle, flashlight, rabbit, skull,
kettle, fox, lynx, hat, harbor seal, alpaca, teapot, glove, sea lion, printer, balloon, stapler, calculator"""
LABELS_238 = [w.strip() for w in LABELS_238.replace("\n", " ").split(",")]
assert len(LABELS_238) == 238, len(LABELS_238)

LONG = ("An image of a sidewalk. A sidewalk is a paved path for pedestrians at the side of a road, usually raised "
        "above the street by a curb and separated from traffic; " * 4)

# (name, text, context_length, truncate)
CASES = [
    ("empty", "", 77, False),
    ("spaces_only", "   \t \n ", 77, False),
    ("plain", "a photo of a dog", 77, False),
    ("accents", "Crème brûlée à la française, naïve façade, Ångström, São Paulo, Zürich", 77, False),
    ("mojibake", "cafÃ© au lait, Ã¼ber, donâ€™t", 77, False),
    ("emoji", "a dog 🐶 on a sofa 🛋️ with 👨‍👩‍👧 family 🇫🇷 ❤️", 77, False),
    ("cjk", "一只猫坐在桌子上。東京タワー、서울 타워", 77, False),
    ("html_entities", "fish &amp; chips &lt;b&gt; &quot;quoted&quot; &#39;x&#39; &eacute;t&eacute; &amp;amp; &amp;lt;",
     77, False),
    ("tabs_newlines", "line one\tcolumn\nline two\r\n\n  line   three \u00a0nbsp\u3000ideographic\x1cfs", 77, False),
    ("contractions", "it's, don't, we're, they've, I'm, you'll, he'd, IT'S, DON'T, 'S 'T", 77, False),
    ("numbers", "3.14159 1,000,000 2024-01-01 ½ ² Ⅻ ٣ 12345678901234567890", 77, False),
    ("special_text", "<|startoftext|>a cat<|endoftext|> and <|ENDOFTEXT|> more", 77, False),
    ("punctuation", "hello!!! what?! ... --- (parens) [brackets] {braces} @user #tag $5 100% a/b\\c", 77, False),
    ("mixed_case", "CamVid Column_Pole SignSymbol LabelMeFacade sidewalk_pavement", 77, False),
    ("overflow_truncate", LONG, 77, True),
    ("overflow_truncate_ctx8", "one two three four five six seven eight nine ten", 8, True),
    ("exact_fit_ctx7", "one two three four five", 7, False),
    ("overflow_raise", LONG, 77, False),
    ("overflow_raise_ctx7", "one two three four five six", 7, False),
]
CASES += [(f"label_word:{w}", w, 77, False) for w in LABELS_238]
CASES += [(f"label_sentence:{w}", f"An image of a {w}. A {w} is what people call a {w}; it's often seen nearby.",
           77, False) for w in LABELS_238]


def load_reference():
    """clip-anytorch's clip/simple_tokenizer.py, loaded by path (no torchvision); None if not installed."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "simple_tokenizer.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("reference_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


def reference_tokenize(ref, text: str, context_length: int = 77, truncate: bool = False):
    """clip/clip.py `tokenize` for one text, unpadded: ids list, or raises RuntimeError on overflow (as it does)."""
    sot, eot = ref.encoder["<|startoftext|>"], ref.encoder["<|endoftext|>"]
    tokens = [sot] + ref.encode(text) + [eot]
    if len(tokens) > context_length:
        if not truncate:
            raise RuntimeError(f"Input {text} is too long for context length {context_length}")
        tokens = tokens[:context_length]
        tokens[-1] = eot
    return tokens


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings that stress every branch: scripts, marks, emoji, entities, contractions, odd whitespace, digits."""
    rng = random.Random(seed)
    pieces = ["dog", "Straße", "naïve", "café", "cafÃ©", "北京", "東京", "서울", "🐶", "👍🏽", "🇯🇵", "&amp;", "&amp;amp;",
              "&lt;tag&gt;", "&#233;", "'s", "'LL", "'d", "n't", "'re", "<|startoftext|>", "<|endoftext|>", "42", "3.5",
              "٣", "½", "Ⅻ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\x1c", "\u200b", "...", "!?", "--", "😀😀",
              "e\u0301", "İstanbul", "ǅ", "ﬁ", "x²", "Ω", "Привет", "مرحبا", "שלום", "ไทย", "a-b_c", "C++", "@#$%"]
    words = [w for w in LABELS_238 for w in w.split()]
    out = []
    for _ in range(n):
        k = rng.randint(0, 12)
        toks = [rng.choice(pieces) if rng.random() < 0.5 else rng.choice(words).capitalize() if rng.random() < 0.2
                else rng.choice(words) for _ in range(k)]
        out.append("".join(t + rng.choice([" ", " ", " ", "", "  ", ",", ". "]) for t in toks))
    return out


def main():
    ref = load_reference()
    if ref is None:
        raise SystemExit("the reference tokenizer is missing: pip install clip-anytorch")
    bpe = Path(importlib.util.find_spec("clip").submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    cases = []
    for name, text, ctx, truncate in CASES:
        case = {"name": name, "text": text, "context_length": ctx, "truncate": truncate}
        try:
            case["ids"] = reference_tokenize(ref, text, ctx, truncate)
            case["decoded"] = ref.decode(case["ids"][1:-1])
        except RuntimeError:
            case["overflow_tokens"] = len(ref.encode(text)) + 2
        cases.append(case)
    FIXTURE.parent.mkdir(parents=True, exist_ok=True)
    meta = {"reference": "clip-anytorch clip/simple_tokenizer.py + clip/clip.py tokenize semantics",
            "ftfy_version": ftfy.__version__, "bpe_sha256": hashlib.sha256(bpe.read_bytes()).hexdigest()}
    lines = [json.dumps(c, ensure_ascii=False) for c in cases]  # one case per line: reviewable diffs
    FIXTURE.write_text(json.dumps(meta, ensure_ascii=False)[:-1] + ', "cases": [\n' + ",\n".join(lines) + "\n]}\n",
                       encoding="utf-8")
    print(f"{len(cases)} cases -> {FIXTURE}")


if __name__ == "__main__":
    main()
