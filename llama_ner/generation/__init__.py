"""Generation: batched greedy answers, the inference scripts' shared config and loading, constrained NER
answers, entity-level scores. Imports the base, weights and model_loading; never training or serving."""
