"""The names of the training modes (light to import: no torch), for the backends, the model
families, the finetuning recipe, the command line and the Finetune dock."""

AUTO_MODE = "auto"                      # the model's own mode (its backend's default_train_mode)
TRAIN_MODES = ("decoder", "full", "lora")  # what a backend's trainable_parameters(mode) knows
TRAIN_MODES_OFFERED = (AUTO_MODE, *TRAIN_MODES)
