"""A minimal, bounds-checked FlatBuffers reader: enough to walk a ``.tflite`` file's tables.

Packaging reads three things from a TFLite model that its interpreter does not give: the
TFLite Metadata buffer, the custom operators it needs, and the tensor names of its
subgraph. Both schemas (TFLite's ``schema.fbs`` and the metadata's ``metadata_schema.fbs``)
are plain FlatBuffers, and reading a table takes a few lines, so this reads them directly
rather than pulling in generated schema modules (``tflite-support`` is not installable
with current NumPy) or the untyped ``flatbuffers`` runtime. Every read is checked against
the buffer, so a truncated or hostile file is a ``ContractError``, never an ``IndexError``
or garbage.

The format: a table starts with a signed offset back to its vtable; the vtable lists, per
field id, the field's offset in the table (0: absent, the schema's default applies).
Offsets to sub-tables, strings and vectors are unsigned and relative to where they are
stored. Field ids count union fields twice (its type, then its value).
"""

from __future__ import annotations

import struct

from shared.errors import ContractError


class Table:
    """One table of a FlatBuffer: read its fields by id."""

    def __init__(self, buf: bytes | memoryview, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        vtable = pos - _unpack("<i", buf, pos)
        self._vsize = _unpack("<H", buf, vtable)
        self._vtable = vtable

    @classmethod
    def root(cls, buf: bytes | memoryview) -> Table:
        return cls(buf, _unpack("<I", buf, 0))

    def _field(self, field: int) -> int:
        """The absolute position of field ``field``, or 0 when it is absent."""
        voff = 4 + 2 * field
        if voff + 2 > self._vsize:
            return 0
        off = _unpack("<H", self.buf, self._vtable + voff)
        return self.pos + off if off else 0

    def _target(self, field: int) -> int:
        at = self._field(field)
        return at + _unpack("<I", self.buf, at) if at else 0

    def has(self, field: int) -> bool:
        return self._field(field) != 0

    def integer(self, field: int, fmt: str = "B", default: int = 0) -> int:
        """An integer field (``fmt`` its struct code: ``B`` ubyte, ``b`` byte, ``I`` uint...)."""
        at = self._field(field)
        return _unpack("<" + fmt, self.buf, at) if at else default

    def real(self, field: int, default: float = 0.0) -> float:
        at = self._field(field)
        if not at:
            return default
        (value,) = struct.unpack("<f", _slice(self.buf, at, 4))
        return float(value)

    def text(self, field: int) -> str | None:
        at = self._target(field)
        if not at:
            return None
        size = _unpack("<I", self.buf, at)
        data = bytes(_slice(self.buf, at + 4, size))
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise ContractError("the model's flatbuffer has a string that is not UTF-8") from None

    def table(self, field: int) -> Table | None:
        at = self._target(field)
        return Table(self.buf, at) if at else None

    def _vector(self, field: int) -> tuple[int, int]:
        """(position of the first element, length) of a vector field; (0, 0) if absent."""
        at = self._target(field)
        if not at:
            return 0, 0
        return at + 4, _unpack("<I", self.buf, at)

    def tables(self, field: int) -> list[Table]:
        start, n = self._vector(field)
        _slice(self.buf, start, 4 * n)
        return [
            Table(self.buf, p + _unpack("<I", self.buf, p)) for p in range(start, start + 4 * n, 4)
        ]

    def numbers(self, field: int, fmt: str) -> list[float]:
        """A vector of scalars (``fmt`` as for ``integer``, or ``f`` for float)."""
        start, n = self._vector(field)
        data = _slice(self.buf, start, struct.calcsize("<" + fmt) * n)
        return [float(v) for v in struct.unpack(f"<{n}{fmt}", data)] if n else []

    def blob(self, field: int) -> memoryview:
        start, n = self._vector(field)
        return memoryview(_slice(self.buf, start, n)) if n else memoryview(b"")


def _slice(buf: bytes | memoryview, start: int, size: int) -> bytes | memoryview:
    if start < 0 or size < 0 or start + size > len(buf):
        raise ContractError("the model's flatbuffer is truncated or corrupt")
    return buf[start : start + size]


def _unpack(fmt: str, buf: bytes | memoryview, at: int) -> int:
    """One integer at ``at`` (``struct`` would read a negative position from the end)."""
    (value,) = struct.unpack(fmt, _slice(buf, at, struct.calcsize(fmt)))
    return int(value)
