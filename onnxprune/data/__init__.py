"""Model input data: arrays, ``.npz`` files, image folders and random feeds behind one reader protocol."""
