"""On PYTHONPATH, this makes `import torch` (and the packages built on it) raise ImportError in every process started
with it, as in a deployment without torch: tests/test_deploy.py runs the torch-free runner, server and text graph so.
(Python imports sitecustomize at start-up; this one shadows any other on the path, which these processes do not need.)
"""
import sys

BLOCKED = ("torch", "torchvision", "transformers", "sentence_transformers")


class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"No module named {name!r} (blocked by tests/no_torch: a deployment without torch)")
        return None


sys.meta_path.insert(0, NoTorch())
