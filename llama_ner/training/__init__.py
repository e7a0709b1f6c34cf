"""What train_trainer.py and train_deepspeed.py share: the training config, the model and LoRA, batches and
loss, processes and launchers, saving and resuming. Imports the base, weights and model_loading; never
generation or serving."""
