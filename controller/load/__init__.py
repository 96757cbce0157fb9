"""Engine load -> endpoint weights: parse engine metrics (`record`), scrape them (`scrape`),
decide weights (`weights`). Only `scrape` does I/O."""
