"""Sample schema, WebDataset shards, converters from public formats, and the procedural demo world."""
