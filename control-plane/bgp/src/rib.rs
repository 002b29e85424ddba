//! MRT RIB dumps to a prefix → origin ASN map. (Being written.)
