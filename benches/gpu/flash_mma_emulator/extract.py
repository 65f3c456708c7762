# Cuts namespace fa2 out of kernels/flash_attn.cu for the emulator (run.sh), PTX primitives swapped for prims.inc.
import re, sys
src = open(sys.argv[1]).read()
start = src.index('namespace fa2 {')
end = src.index('}  // namespace fa2') + len('}  // namespace fa2')
body = src[start:end]
p0 = body.index('// ---- fa2 primitives')
p1 = body.index('// ---- end of fa2 primitives ----')
body = body[:p0] + '#include "prims.inc"\n' + body[p1:]
old = 'extern __shared__ __align__(16) unsigned char smem[];'
assert body.count(old) == 6
body = body.replace(old, 'unsigned char* smem = emu::blk->smem;')
open(sys.argv[2], 'w').write(body)
