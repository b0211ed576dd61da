"""The names of the files and folders a model or a training run is made of, in one place."""

CONFIG = "config.json"                 # a Hugging Face model folder's config
ENCODER_ONNX = "image_encoder.onnx"    # an ONNX export: the image encoder ...
DECODER_ONNX = "prompt_decoder.onnx"   # ... and the text encoder + decoder
METADATA = "training.json"             # how a checkpoint was trained
BEST, LAST = "best", "last"            # a training run's checkpoints
