"""Read the items of a JSON file's top-level arrays one by one, in bounded memory (indexes.py reads Objects365's
5 GB train JSON with it; json.load would build tens of GB of Python objects).

Text is read a chunk at a time and decoded by the json module's C scanner: runs of whole objects in one call where
the chunk holds them, single values otherwise. tests/test_indexes.py checks it against json.load at chunk sizes that
cut every number, string and object.
"""
import json
import re

from errors import DataError

_BLANK = re.compile(r"[ \t\n\r]*")
_ENDED = re.compile(r"[^ \t\n\r,\]}:]*[ \t\n\r,\]}:]")  # a delimiter follows: the value before it is whole
_DECODER = json.JSONDecoder()


class _JsonStream:
    """A JSON text read `chunk` characters at a time; values are decoded by the json module's C scanner."""

    def __init__(self, f, path, chunk: int):
        self.f, self.path, self.chunk = f, path, chunk
        self.buf, self.pos, self.dropped, self.eof = "", 0, 0, False
        self.chunks, self.run_failed = 0, -1  # chunks read; the chunk in which a run last failed to decode

    def more(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at the end of the file."""
        data = "" if self.eof else self.f.read(self.chunk)
        self.dropped += self.pos
        self.buf, self.pos, self.eof = self.buf[self.pos:] + data, 0, not data
        self.chunks += bool(data)
        return bool(data)

    def peek(self) -> str:
        """The next character that is not blank, not consumed; "" at the end of the file."""
        while True:
            self.pos = _BLANK.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def take(self, allowed: str) -> str:
        c = self.peek()
        if not c or c not in allowed:
            self.fail(f"expected one of {list(allowed)}, found {c or 'the end of the file'!r}")
        self.pos += 1
        return c

    def value(self):
        """The next value. A value cut by the end of the buffer either fails to decode (a string, an object) or
        decodes to a prefix not followed by a delimiter (a number: "0." of "0.25"): read more and decode again."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
                if self.eof or _ENDED.match(self.buf, end):
                    self.pos = end
                    return value
            except json.JSONDecodeError as e:
                if self.eof:
                    self.fail(e.msg)
            self.more()

    def items(self) -> list:
        """The next items of the current array: one, or, where the buffer holds a run of whole objects (COCO's
        arrays), all of them up to the buffer's last '}' decoded in one call, which saves the per-item Python work
        on 25M annotations. Text that is not such a run (the array ends inside it, the last '}' closes a nested
        object or lies in a string) does not decode as a list: then items go one by one until the next chunk."""
        self.peek()
        if self.chunks > self.run_failed:
            cut = self.buf.rfind("}", self.pos)
            if cut > self.pos:
                try:
                    run = _decode_run(self.buf[self.pos:cut + 1])
                    self.pos = cut + 1
                    return run
                except json.JSONDecodeError:
                    self.run_failed = self.chunks
        return [self.value()]

    def fail(self, message: str):
        raise DataError(f"{self.path}: not valid JSON at character {self.dropped + self.pos}: {message}")


def _decode_run(text: str) -> list:
    """`item, item, ...` -> [item, ...]; raises unless the text is exactly a run of whole values."""
    return json.loads("[" + text + "]")


def json_array_items(path, chunk: int = 1 << 22, arrays: set | None = None):
    """Yield (member name, item) for every item of every top-level array of a JSON object file (adding the names of
    those arrays, empty ones too, to `arrays`); other members are read and passed over. Memory stays one chunk plus
    one item, where json.load would hold the whole document."""
    with open(path, encoding="utf-8") as f:
        s = _JsonStream(f, path, chunk)
        s.take("{")
        if s.peek() == "}":
            s.pos += 1
            return
        while True:
            key = s.value()
            if not isinstance(key, str):
                s.fail("expected a member name")
            s.take(":")
            if s.peek() == "[":
                s.pos += 1
                if arrays is not None:
                    arrays.add(key)
                if s.peek() == "]":
                    s.pos += 1
                else:
                    while True:
                        for item in s.items():
                            yield key, item
                        if s.take(",]") == "]":
                            break
            else:
                s.value()
            if s.take(",}") == "}":
                break
        if s.peek():
            s.fail("data after the end of the object")
