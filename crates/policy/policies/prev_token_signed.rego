# prev_token_signed: the caller really is the previous hop: segment index-1's token verified
# against the TLS peer's certificate (nsm verifies before evaluation) and names the peer as its
# subject. A path whose index is 0 has no previous hop, so nothing vouches for the caller.
package nsm

prev := input.path_segments[input.index - 1]

default valid := false

valid if {
	prev.signature_verified == true
	prev.claims.sub == input.peer_spiffe_id
}

deny contains "index is 0: the caller put no segment of its own in the path" if input.index == 0

deny contains msg if {
	input.index > 0
	not prev
	msg := sprintf("the path has no segment %d for the caller", [input.index - 1])
}

deny contains msg if {
	prev.signature_verified != true
	msg := sprintf("segment %d (%s): token is not signed by the TLS peer %s", [input.index - 1, prev.name, input.peer_spiffe_id])
}

deny contains msg if {
	prev.signature_verified == true
	prev.claims.sub != input.peer_spiffe_id
	msg := sprintf("segment %d (%s): token's subject %s is not the TLS peer %s", [input.index - 1, prev.name, prev.claims.sub, input.peer_spiffe_id])
}
