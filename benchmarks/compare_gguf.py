"""What differs between two GGUF files: tensors byte for byte, metadata key by key (float arrays summarised).

    python3 benchmarks/compare_gguf.py A.gguf B.gguf
"""

import sys

import numpy as np
from gguf import GGUFReader


def main(a_path: str, b_path: str) -> None:
    a, b = GGUFReader(a_path), GGUFReader(b_path)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    if list(ta) != list(tb):
        print(f"tensor lists differ: only in A {sorted(set(ta) - set(tb))}, only in B {sorted(set(tb) - set(ta))}")
    common = [n for n in ta if n in tb]
    differing = [n for n in common if ta[n].tensor_type != tb[n].tensor_type
                 or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    print(f"tensors: {len(common)} in both, differing: {differing}")
    fa, fb = a.fields, b.fields
    for key in sorted(set(fa) ^ set(fb)):
        print(f"{key}: only in {'A' if key in fa else 'B'}")
    for key in (k for k in fa if k in fb):
        va, vb = fa[key].contents(), fb[key].contents()
        if va == vb:
            continue
        if isinstance(va, list) and va and isinstance(va[0], float) and len(va) == len(vb):
            x, y = np.array(va), np.array(vb)
            rel = np.abs(y - x) / np.maximum(np.abs(x), 1e-30)
            print(f"{key}: {int((x != y).sum())} of {len(x)} values differ, relative change at most {rel.max():.2e}")
        else:
            print(f"{key}: {str(va)[:80]} -> {str(vb)[:80]}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
