"""Parameter-efficient fine-tuning as `f(model) -> model` transforms applied from outside the model: LoRA (and
DoRA, rsLoRA), bottleneck adapters, prompt tuning. The base layers keep their names and state-dict keys."""
