"""RELION's files, and the only code that reads or writes them: particle STAR files (star), image
stacks (stacks), MRC maps (mrc), model.star (model_star) and the External job's markers (external)."""
