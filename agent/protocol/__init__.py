"""Wire formats shared by builder and agent: manifest, signing, artifact, device profiles."""
