"""FaceMoE Edge: trainer, and the model contract the app and the engine stand on.

Layering (enforced by tests/test_layers.py, which parses every module's imports):

    app/      the product       -> may import engine and trainer
    engine/   export, runtimes  -> may import the model contract of trainer, never app
    trainer/  models, training  -> imports neither app nor engine

The model contract is the part of trainer that every model artifact and runtime is defined by
(`CONTRACT`, closed under its own imports: it needs nothing else of trainer):

- `trainer.models`: the registry (`create_model`, `list_models`, `model_config`) of every
  backbone and the MoE layer (`trainer.models.moe`). Fused inference kernels of the routing op
  are the engine's; the engine registers them with `register_dispatch` (`engine.ops.triton_moe`
  registers "triton" when imported), so the dependency points from engine to trainer.
- `trainer.manifest`: manifest.json, the one reader, writer and validator of the input and
  identity contract of an artifact (input size, mean/std, colour, crop template, embedding
  dimension, weights hash), also carried in ONNX metadata.
- `trainer.preprocess`: the crop templates and the crop-to-tensor conversion.
- `trainer.artifact`: the artifact directory (weights + model.yaml + manifest), save and load.
- `trainer.fsutil`: the one atomic file writer (unpredictable temporaries, private modes) that
  the manifest, the engine's plans and caches, checkpoints and every app file are written by.

Everything else under trainer/ (config, data, augment, losses, train, soup, evaluate, explain,
importers) makes models; the app's CLI fronts those tools, the runtime path does not need them.
"""

CONTRACT = ("trainer.models", "trainer.manifest", "trainer.preprocess", "trainer.artifact",
            "trainer.fsutil")
