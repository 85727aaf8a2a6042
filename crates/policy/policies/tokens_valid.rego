# tokens_valid: every token the caller vouches for (segments 0..index) is a JWT with sub, aud and
# exp. nsm decodes the tokens before evaluation; a segment whose token is missing or does not
# decode has no claims. An empty path passes here (prev_token_signed refuses it).
package nsm

undecodable contains i if {
	some i, seg in input.path_segments
	i <= input.index
	not is_object(seg.claims)
}

index_outside_path if {
	count(input.path_segments) > 0
	input.index >= count(input.path_segments)
}

default valid := false

valid if {
	count(undecodable) == 0
	not index_outside_path
}

deny contains msg if {
	some i in undecodable
	msg := sprintf("segment %d (%s): token is missing or not a JWT", [i, input.path_segments[i].name])
}

deny contains msg if {
	index_outside_path
	msg := sprintf("index %d is outside the path's %d segments", [input.index, count(input.path_segments)])
}
