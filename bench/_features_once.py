"""One measured run for bench/speed.py, in its own process: prints JSON with seconds and images.

    python bench/_features_once.py naive ROOT CACHE_DIR
    python bench/_features_once.py pipeline ROOT CACHE_DIR [section.key=value ...]

Both modes build the same Keras backbone from the converted weights in CACHE_DIR and time
everything after the imports: listing, decoding, resizing, the backbone, and (pipeline) hashing
and writing HDF5.
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

mode, root, cache_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
from pipeline import params as params_mod  # noqa: E402
from pipeline.tf_import import keras as quiet_keras  # noqa: E402

keras = quiet_keras()
if mode == "naive":
    from pipeline import backbones

    started = time.perf_counter()
    model = backbones.build("efficientnet_lite0", cache_dir=cache_dir).model
    dataset = keras.utils.image_dataset_from_directory(root, labels="inferred", image_size=(224, 224),
                                                       batch_size=32, shuffle=False, verbose=False)
    features = model.predict(dataset.map(lambda images, labels: images), verbose=0)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "images": int(features.shape[0])}))
else:
    from pipeline import features

    raw = {"data": {"root": str(root)}, "paths": {"cache_dir": str(cache_dir)}}
    for override in sys.argv[4:]:
        section, key, value = params_mod.parse_override(override)
        raw.setdefault(section, {})[key] = value
    params = params_mod.build(raw, "bench")
    started = time.perf_counter()
    result = features.run(params, Path("."))
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "images": result.n_rows, "new": result.n_new}))
