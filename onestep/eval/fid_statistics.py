"""`onestep fid` reference statistics: features / FID statistics of the inputs that are not generated, through
torch-fidelity's cached functions under onestep's cache names, and the number of reference images."""
from __future__ import annotations

import json
from contextlib import nullcontext
from pathlib import Path

from .fid_inputs import _reference_dataset


def _blas_one_thread():
    """torch-fidelity's np.linalg.eigvals on a 2048x2048 product: ~4 s with one BLAS thread, ~60 s with two spinning
    threads on a contended 2-core machine (measured)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")



def _reference_inputs(sources, o, extractor, layers, first_layers, binary_layers, cuda, tf_kwargs, cache_root,
                      feats, stats, counts) -> None:
    """Features (when KID/PRC/IS need them) and FID statistics of the inputs that are not generated, through
    torch-fidelity's cached functions (keyed by our cache name); fills feats/stats/counts in place."""
    from torch_fidelity.metric_fid import (
        fid_featuresdict_to_statistics_cached,
        fid_input_id_to_statistics_cached,
    )
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    for i, s in enumerate(sources):
        if s.generated:
            continue
        fe = extractor.get(first_layers if i == 0 else binary_layers, cuda)
        dataset, name, counts[i] = _reference_dataset(s, o.datasets_root, o.progress)
        cache_name = f"{name}-w{extractor.fingerprint or 'default'}"
        kw = {**tf_kwargs, "input1": dataset, "input1_cache_name": cache_name, "verbose": o.progress}
        if o.kid or o.prc or (i == 0 and o.isc):
            feats[i] = extract_featuresdict_from_input_id_cached(1, fe, **kw)
            stats[i] = fid_featuresdict_to_statistics_cached(feats[i], cache_name, fe, layers["fid"], **kw)
        else:  # FID only: cached statistics suffice (the dataset is not even built)
            stats[i] = fid_input_id_to_statistics_cached(1, fe, layers["fid"], **kw)
        counts[i] = counts[i] or _cached_count(Path(cache_root), cache_name, dataset, feats[i], o.cache)


def _cached_count(cache_root: Path, cache_name: str, dataset, feats: dict | None, cache: bool) -> int:
    """Number of reference images; remembered beside torch-fidelity's cache so cached statistics need no dataset."""
    if feats is not None:
        n = len(next(iter(feats.values())))
    else:
        meta = cache_root / f"{cache_name}-onestep.json"
        if cache and meta.is_file():
            return int(json.loads(meta.read_text())["num_samples"])
        n = len(dataset)
    if cache:
        cache_root.mkdir(parents=True, exist_ok=True)
        (cache_root / f"{cache_name}-onestep.json").write_text(json.dumps({"num_samples": n}) + "\n")
    return n

