"""The keys the plugin writes into napari layers' ``metadata``, in one place (docks, label
writing and the tests read them from here)."""

IMAGE = "vlsm_image"              # a Labels layer: the name of the image layer it labels
LABELS = "vlsm_labels"            # a Labels layer: {label value: prompt}
MODEL = "vlsm_model"              # a Labels layer: the model that wrote it
PROMPTS = "vlsm_prompts"          # a Labels layer: the prompts of the run that wrote it
THRESHOLD = "vlsm_threshold"      # a Labels layer: the threshold its labels were cut at
PROBABILITY = "vlsm_probability"  # an Image layer: True for the plugin's probability maps
