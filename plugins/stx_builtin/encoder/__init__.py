"""The self-supervised spectral transformer behind the ``transformer`` featurizer.

* :mod:`.model`: the encoder (a torch ``nn.Module``) and its configuration.
* :mod:`.train`: masked-patch pretraining on a feature store made by the ``raw`` featurizer.
* :mod:`.io`: encoder directories (``manifest.json`` + ``encoder.safetensors`` with its sha256).

torch is imported by these modules; the plugin module that registers the featurizer and the
``stx encoder`` commands imports them only inside functions.
"""
