"""The one reader and writer of torch files: save_torch_file (atomic torch.save) and read_torch_file (torch.load of
tensors only, whose own errors name no file, and TorchScript archives read without running their code).

Every weight file the project reads (checkpoints, public pretrained weights, CLIP and BERT weights, label tables)
goes through read_torch_file, so a file that is not what it should be raises errors.WeightsError naming the path and
what it should be, and a file holding objects other than tensors is refused, naming the first such global.
"""
import io
import os
import pickle
import pickletools
import re
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from errors import InputError, WeightsError


def save_torch_file(obj, path) -> None:
    """torch.save(obj) to path atomically: a temp file beside it (named by the pid, so two writers never share one),
    fsync, rename. A kill mid-write leaves the old file or none, never half of one; a failed write (disk full,
    quota) removes the temp file and raises, the old file untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # a full disk or quota may only show here
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_torch_file(path, what: str):
    """The tensors and plain Python of a torch.save file (torch.load with weights_only: nothing in the file runs), or
    of a TorchScript archive (read_torchscript: its tensors, none of its code), on the CPU.

    A path that is missing, a folder, or not such a file raises WeightsError naming the path and `what` it should
    be (with where such files come from); a file holding other objects is refused for safety, naming the first such
    global. torch's own errors name neither, and suggest loading unsafely."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: {'a folder' if path.is_dir() else 'no such file'}; expected {what}")
    if is_torchscript(path):
        return read_torchscript(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as e:  # not torch.save's bytes: KeyError, EOFError, RuntimeError (zip), UnpicklingError ...
        # torch names the refused global in one of two phrasings; where it names none (a pickle of protocol 4 or
        # 5 stops it at the first opcode it does not know), the file's globals are read opcode by opcode
        found = re.search(r"GLOBAL (\S+?)(?: was not an allowed global| whose module)", str(e))
        found = found[1] if found else next(iter(unsafe_globals(path)), None)
        why = (f"it holds objects other than tensors ({found}), refused for safety: unpickling them could run code"
               if found else f"not a complete file written by torch.save ({type(e).__name__})")
    raise WeightsError(f"{path}: {why}; expected {what}")


# ---- Reading without running: the globals of a pickle, the tensors of a TorchScript archive ----------------------

def unsafe_globals(path) -> list[str]:
    """`module.name` of every global a torch.save file's pickle names that is neither torch's nor an OrderedDict (a
    torch.save of tensors names no other), read with pickletools, which decodes opcodes and runs nothing. A file
    that is no pickle (or a zip without data.pkl) gives []."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = [z.read(n) for n in z.namelist() if n.endswith("/data.pkl")][:1]
            stream = io.BytesIO(data[0] if data else b"")
        else:
            stream = open(path, "rb")
    except (OSError, zipfile.BadZipFile):
        return []
    names, pushed, memo = [], [], {}  # pushed: the strings (or None) last pushed, for STACK_GLOBAL's two
    with stream:
        for _ in range(4):  # the legacy torch.save format is 4 pickles in a row (magic, protocol, sys info, object)
            try:
                for op, arg, _ in pickletools.genops(stream):
                    if op.name == "GLOBAL":
                        names.append(arg.replace(" ", "."))
                    elif op.name == "STACK_GLOBAL" and len(pushed) >= 2 and None not in pushed[-2:]:
                        names.append(".".join(pushed[-2:]))
                    if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
                        memo[len(memo) if op.name == "MEMOIZE" else arg] = pushed[-1] if pushed else None
                    elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                        pushed.append(memo.get(arg))
                    elif op.name not in ("PROTO", "FRAME", "STOP", "MARK"):
                        pushed.append(arg if isinstance(arg, str) and "UNICODE" in op.name else None)
                    del pushed[:-2]
            except ValueError:  # the end of the file, or bytes that are no pickle
                break
    return [n for n in names if not n.startswith("torch.") and n != "collections.OrderedDict"]


def is_torchscript(path) -> bool:
    """A TorchScript archive (torch.jit.save; OpenAI's CLIP .pt files): a zip with a constants.pkl, as torch.load
    tells them from torch.save's zips."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


# torch.jit.save writes a module tree into <name>/data.pkl as `__torch__.<class>` objects, each with a dict of its
# attributes (parameters, buffers, submodules, plain values), tensors as torch._utils._rebuild_tensor_v2 of a
# storage <name>/data/<key>, and the classes' TorchScript source under <name>/code/. torch.jit.load compiles that
# source and runs a class's __setstate__ on its object: code from the file. Here the objects are plain stand-ins
# (TorchScriptObject), the source is only searched for which attributes are parameters or buffers, and a class
# with its own __setstate__ is refused.
STORAGE_DTYPES = {"FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
                  "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


class TorchScriptObject:
    """An object of a TorchScript class as data.pkl holds it: the class name and its pickled state, nothing run.
    read_torchscript makes a subclass per class of the archive (pickle's NEWOBJ wants a type)."""
    qualname, state = "", None

    def __setstate__(self, state):  # pickle's BUILD: keep the state (TorchScript's __setstate__ is never run)
        self.state = state


def torchscript_classes(z: zipfile.ZipFile, prefix: str) -> dict[str, dict]:
    """`__torch__.<module>.<class>` -> {"module": bool, "parameters", "buffers": attribute names, "setstate": bool}
    of every class in the archive's TorchScript source (read as text, never compiled)."""
    classes = {}
    for name in z.namelist():
        if not (name.startswith(prefix + "code/") and name.endswith(".py")):
            continue
        module = name[len(prefix + "code/"):-len(".py")].replace("/", ".")
        info = None
        for line in z.read(name).decode("utf-8", "replace").splitlines():
            if m := re.match(r"class (\w+)\((\w*)", line):
                info = classes[f"{module}.{m[1]}"] = {"module": m[2] == "Module", "parameters": [], "buffers": [],
                                                      "setstate": False}
            elif info is not None and (m := re.match(r"  __(parameters|buffers)__ = \[(.*)\]", line)):
                info[m[1]] = re.findall(r'"([^"]*)"', m[2])
            elif info is not None and line.startswith("  def __setstate__("):
                info["setstate"] = True
    return classes


def read_torchscript(path, what: str) -> dict[str, torch.Tensor]:
    """A TorchScript archive's state dict (parameters and buffers by their dotted names, in torch.jit.load(path)
    .state_dict()'s order and dtypes) without running anything from it: data.pkl is unpickled by a restricted
    unpickler that builds tensors, OrderedDicts and stand-ins for the archive's classes, and refuses any other
    global (naming the file and the global), as it refuses a class that has its own __setstate__."""
    def refuse(why):
        return WeightsError(f"{path}: a TorchScript archive {why}; expected {what}")


    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise refuse("without <name>/data.pkl (not written by torch.jit.save)")
        prefix = pkl[0][:-len("data.pkl")]
        if prefix + "byteorder" in z.namelist() and z.read(prefix + "byteorder").decode().strip() != sys.byteorder:
            raise refuse(f"of {z.read(prefix + 'byteorder').decode().strip()}-endian tensors")
        classes, storages = torchscript_classes(z, prefix), {}

        def storage(key, dtype):  # (numel,) tensor over the record's bytes; tensors of one storage share it
            if key not in storages:
                data = bytearray(z.read(f"{prefix}data/{key}"))
                storages[key] = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
            return storages[key]

        class Unpickler(pickle.Unpickler):
            def find_class(self, module, name):
                full = f"{module}.{name}"
                if full == "torch._utils._rebuild_tensor_v2":
                    return lambda flat, offset, size, stride, *_: flat.as_strided(size, stride, offset)
                if full == "collections.OrderedDict":
                    return OrderedDict
                if module == "torch" and name in STORAGE_DTYPES:
                    return STORAGE_DTYPES[name]
                if module == "torch.jit._pickle" and name in ("build_intlist", "build_doublelist", "build_boollist",
                                                              "build_tensorlist", "restore_type_tag"):
                    return lambda value, *type_tag: value  # torch's own return their first argument as it is
                if full in classes and not classes[full]["setstate"]:
                    return type(name, (TorchScriptObject,), {"qualname": full})
                why = ("has its own __setstate__, code that torch.jit.load would run" if full in classes else
                       "is not a class of the archive's source" if module.startswith("__torch__") else
                       "is neither a tensor nor a module")
                raise refuse(f"holding {full}, which {why}; refused for safety")

            def persistent_load(self, pid):  # ('storage', dtype, key, location, numel)
                if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                    raise refuse(f"holding an unknown persistent id {pid!r:.100}")
                return storage(pid[2], pid[1])

        try:
            root = Unpickler(io.BytesIO(z.read(pkl[0]))).load()
        except InputError:
            raise
        except Exception as e:  # truncated records, shapes past a storage's end, a broken pickle
            raise refuse(f"that cannot be read ({type(e).__name__}: {e})") from None

    out = {}

    def collect(obj, prefix):  # torch's order: own parameters, own buffers, then submodules
        info, attrs = classes[obj.qualname], obj.state
        if not isinstance(attrs, dict):
            raise refuse(f"whose {obj.qualname} holds no attribute dict")
        for kind in ("parameters", "buffers"):
            out.update((prefix + k, v) for k, v in attrs.items() if k in info[kind] and torch.is_tensor(v))
        for k, v in attrs.items():
            if isinstance(v, TorchScriptObject) and classes[v.qualname]["module"]:
                collect(v, f"{prefix}{k}.")

    if not (isinstance(root, TorchScriptObject) and classes[root.qualname]["module"]):
        raise refuse("whose data.pkl holds no module")
    collect(root, "")
    return out
