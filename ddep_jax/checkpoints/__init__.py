"""Model files in and out: `store` (Orbax checkpoints of the train state and
the data iterator, exact partial restore of collections), `handover` (a
stage's initial weights from another run or an .npz, with init.json
lineage), `vit_import` (the public ImageNet-21k .npz -> an encoder
checkpoint) and `onnx_export` (a fine-tuned segmenter -> ONNX)."""
