# tokens_chained: the hops form an unbroken chain: for every pair of consecutive segments up to
# index, the first's token is addressed (aud) to the second's signer (sub). A token lifted from
# another path is addressed to someone else and breaks the chain. Paths of fewer than two segments
# pass.
package nsm

addressed_to(seg, next) if next.claims.sub in seg.claims.aud

unchained contains i if {
	some i, next in input.path_segments
	i > 0
	i <= input.index
	not addressed_to(input.path_segments[i - 1], next)
}

default valid := false

valid if count(unchained) == 0

deny contains msg if {
	some i in unchained
	seg := input.path_segments[i - 1]
	next := input.path_segments[i]
	aud := object.get(seg, ["claims", "aud"], [])
	sub := object.get(next, ["claims", "sub"], "nobody")
	msg := sprintf("segment %d (%s): token is addressed to %v, not to segment %d (%s) signed by %s", [i - 1, seg.name, aud, i, next.name, sub])
}
