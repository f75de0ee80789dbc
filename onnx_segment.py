"""A deployment's two graphs (export.py --deploy_dir) run by onnxruntime with numpy (no torch): label texts -> label
embeddings with the text graph (onnx_text.TextGraph, through the text cache), and a photo -> the protocol's
probabilities and cosines at the photo's size, as inference.infer computes them for predict.py and serve.py with
--sliding=false at one scale without flip: the photo resized to the base size (images.resize_bilinear), the
open-vocabulary graph's `prob` and `cos` (padding, network, similarity, upsampling, crop and softmax inside), resized
to the photo's size. The ids follow from them by score_rules.ids_from_scores. run_onnx.py and serve_onnx.py use it.
"""
import json
from pathlib import Path

import numpy as np

from errors import ConfigError, WeightsError
from images import IMAGENET_MEAN, IMAGENET_STD, resize_bilinear, short_side_size, whole_image_work
from onnx_text import TextGraph, open_session
from text_cache import TextEncoder, embed_texts, file_sha256


def same_encoder(table_encoder, text_encoder):
    """Whether a text graph's encoder (e.g. "clip-text ViT-B-32.pt") made the rows of a table whose encoder is
    `table_encoder` (the image graph's metadata: the same id, or with the text mode after it, "... (sentence)")."""
    return table_encoder == text_encoder or table_encoder.startswith(text_encoder + " (")


class OnnxSegmenter:
    """The image graph (export.py --deploy_dir: --open_vocab with the outputs prob and cos) and the text graph."""

    def __init__(self, image_graph, text_graph, threads=0, cache=""):
        """threads: onnxruntime's intra-op threads (0 = its default); cache: the text cache's folder (text_cache.py;
        "" = $SSIW_CACHE or ~/.cache/ssiw, "off")."""
        path = Path(image_graph)
        self.session = open_session(path, threads)
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if "label_emb" not in inputs or not {"prob", "cos"} <= set(outputs):
            raise WeightsError(f"{path}: inputs {inputs}, outputs {outputs}; expected an open-vocabulary image graph "
                               f"with the outputs prob and cos (export.py --deploy_dir)")
        self.meta = self.session.get_modelmeta().custom_metadata_map
        norm = json.loads(self.meta["input"])
        if not (np.allclose(norm["mean"], IMAGENET_MEAN) and np.allclose(norm["std"], IMAGENET_STD)
                and np.isclose(norm["scale"], 1 / 255)):
            raise WeightsError(f"{path}: metadata input={self.meta['input']}; this runtime normalises as "
                               f"images.normalized does (RGB / 255, ImageNet mean and std)")
        self.max_labels, self.embed_dim = int(self.meta["max_labels"]), int(self.meta["embed_dim"])
        self.text = TextGraph(text_graph, threads)
        if not same_encoder(self.meta["encoder"], self.text.encoder) or self.text.embed_dim != self.embed_dim:
            raise WeightsError(f"{text_graph} embeds with {self.text.encoder} ({self.text.embed_dim}-d), but "
                               f"{path} takes label embeddings of {self.meta['encoder']} ({self.embed_dim}-d); export "
                               f"the pair together (export.py --deploy_dir)")
        # the text graph's rows are cached under its own file's sha256: never mixed with the torch encoder's rows
        self.encoder = TextEncoder(self.text.encoder, file_sha256(text_graph), lambda: self.text.embed)
        self.cache = cache
        self.image_graph, self.text_graph = str(image_graph), str(text_graph)

    def label_embeddings(self, texts):
        """Texts -> ((N, D) float32 unit rows, how many came from the text cache)."""
        return embed_texts(self.encoder, list(texts), self.cache)

    @staticmethod
    def work_size(base_size):
        """images.open_image's work_size for a photo processed at base_size (the budget is checked with it)."""
        return whole_image_work(base_size)

    def scores(self, image, label_emb, base_size, out_size=None):
        """image (3, H, W) normalised (images.normalized), label_emb (N, D) -> prob, cos (N, H_out, W_out) float32
        at out_size (default (H, W)): the image's short side resized to base_size (0 = as it is), the graph, and its
        outputs resized to out_size (bilinear, align_corners=False), as inference.infer does."""
        h, w = image.shape[-2:]
        x = resize_bilinear(image, short_side_size(h, w, base_size)) if base_size else image  # (3, h_s, w_s)
        n = len(label_emb)
        feeds = {"image": x[None], "label_emb": np.asarray(label_emb, np.float32)}
        if self.max_labels:  # a graph of static shapes: the labels, then rows of padding up to max_labels
            if n > self.max_labels:
                raise ConfigError(f"{n} labels (with background): more than {self.image_graph} takes "
                                  f"(max_labels={self.max_labels})")
            feeds["label_emb"] = np.concatenate([feeds["label_emb"], np.zeros((self.max_labels - n, self.embed_dim),
                                                                              np.float32)])
            feeds["label_count"] = np.array([n], np.int64)
        prob, cos = self.session.run(["prob", "cos"], feeds)              # (1, N', h_s, w_s) each
        out_size = tuple(out_size or (h, w))
        return resize_bilinear(prob[0, :n], out_size), resize_bilinear(cos[0, :n], out_size)  # (N, H_out, W_out)
