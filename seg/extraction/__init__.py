"""Stage one's parts: its config, the manifest planned before anything is computed, the cache directory
it owns and resumes, the samples fed to the backbone, and the loop that writes shards.
`seg.extract_features.extract` puts them together."""
