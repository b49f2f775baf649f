"""The bus contract: message schemas, the envelope, codecs and the catalog."""
