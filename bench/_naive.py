"""The way a Keras user would extract features, as one process: prints JSON with the photos done.

    python bench/_naive.py ROOT CACHE_DIR

``keras.utils.image_dataset_from_directory`` + ``model.predict`` on the same EfficientNet-Lite0,
built from the Keras weights already converted into CACHE_DIR/weights (as the pipeline's own
converted weights are: both warm). Timed by the caller from process start to exit.
"""
import json
import sys
from pathlib import Path

from pipeline.backbones import keras_models  # noqa: E402
from pipeline.tf_import import keras as quiet_keras  # noqa: E402

keras = quiet_keras()
root, cache_dir = Path(sys.argv[1]), Path(sys.argv[2])
model = keras_models.build("efficientnet_lite0", weights_dir=cache_dir / "weights").model
dataset = keras.utils.image_dataset_from_directory(root, labels="inferred", image_size=(224, 224), batch_size=32,
                                                   shuffle=False, verbose=False)
features = model.predict(dataset.map(lambda images, labels: images), verbose=0)
print(json.dumps({"images": int(features.shape[0])}))
