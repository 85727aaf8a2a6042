# tokens_expired: every token the caller vouches for (segments 0..index) expires after now.
# Undecodable tokens are tokens_valid's to refuse.
package nsm

expired contains i if {
	some i, seg in input.path_segments
	i <= input.index
	seg.claims.exp <= input.now
}

default valid := false

valid if count(expired) == 0

deny contains msg if {
	some i in expired
	seg := input.path_segments[i]
	msg := sprintf("segment %d (%s): token of %s expired at %d, now is %d", [i, seg.name, seg.claims.sub, seg.claims.exp, input.now])
}
