-- wrk script that sends keep-alive POST requests with a fixed JSON body.
-- Usage: wrk -s post.lua URL -- BODY_FILE
-- wrk builds the request once per thread, after init() has set the body.

function init(args)
   local path = args[1]
   if path == nil then
      error("missing body file: pass its path after --")
   end
   local file = assert(io.open(path, "rb"))
   wrk.method = "POST"
   wrk.body = file:read("*a")
   wrk.headers["Content-Type"] = "application/json"
   file:close()
end
