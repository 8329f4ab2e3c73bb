"""Tamper evidence: signed manifests, the hourly digest chain, verification, bundles and legal hold.

Every evidence document is canonical JSON (sorted keys, compact, UTF-8) signed with a KMS
asymmetric key (ECDSA P-256 over SHA-256), so ``openssl dgst -sha256 -verify`` checks it offline.
"""
