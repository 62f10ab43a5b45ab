# Shared by the C API checks (script mode): the functions of instinfer.h and the nodes of
# instinfer.map, read from the files themselves.

# instinfer_read_lines(<file> <out_list>): the file's lines as a CMake list. ";" becomes "," and
# square brackets become "<" ">" first: both would otherwise split or glue list elements (buffer
# shapes such as [n_seq][head_dim] are everywhere in these files).
function(instinfer_read_lines file out_list)
  file(READ "${file}" text)
  string(REPLACE ";" "," text "${text}")
  string(REPLACE "[" "<" text "${text}")
  string(REPLACE "]" ">" text "${text}")
  string(REPLACE "\n" ";" text "${text}")
  set(${out_list} "${text}" PARENT_SCOPE)
endfunction()

# instinfer_header_functions(<header> <out_list>): every function declared in the header, in
# header order. A declaration starts at column 0 with its return type and has the name and "(" on
# its first line; comment lines and typedefs never match.
function(instinfer_header_functions header out_list)
  instinfer_read_lines("${header}" lines)
  set(names "")
  foreach(line IN LISTS lines)
    if(line MATCHES "^[A-Za-z_][A-Za-z0-9_ *]*[ *](instinfer_[a-z0-9_]+)\\(")
      list(APPEND names "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  if(names STREQUAL "")
    message(FATAL_ERROR "no function declarations found in ${header}")
  endif()
  set(${out_list} "${names}" PARENT_SCOPE)
endfunction()

# instinfer_header_api_version(<header> <out_var>): "MAJOR.MINOR" of INSTINFER_VERSION_*.
function(instinfer_header_api_version header out_var)
  file(STRINGS "${header}" defines REGEX "^#define INSTINFER_VERSION_(MAJOR|MINOR) ")
  set(major "")
  set(minor "")
  foreach(line IN LISTS defines)
    if(line MATCHES "^#define INSTINFER_VERSION_MAJOR +([0-9]+)$")
      set(major "${CMAKE_MATCH_1}")
    elseif(line MATCHES "^#define INSTINFER_VERSION_MINOR +([0-9]+)$")
      set(minor "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  if(major STREQUAL "" OR minor STREQUAL "")
    message(FATAL_ERROR "${header} lacks INSTINFER_VERSION_MAJOR/MINOR")
  endif()
  set(${out_var} "${major}.${minor}" PARENT_SCOPE)
endfunction()

# instinfer_read_map(<map>): sets, in the caller's scope,
#   map_nodes            the version nodes in file order ("INSTINFER_0.1;INSTINFER_0.2")
#   map_symbols_<node>   the names listed under global: in that node
#   map_parent_<node>    the node it inherits ("" for the first)
# and fails on a wildcard among the global names or a name listed twice.
macro(instinfer_read_map map)
  file(READ "${map}" _map_text)
  string(REGEX REPLACE "/\\*([^*]|\\*+[^*/])*\\*+/" "" _map_text "${_map_text}")  # comments
  string(REGEX REPLACE "[ \t\r\n]+" " " _map_text "${_map_text}")
  string(REPLACE ";" "," _map_text "${_map_text}")  # "," ends an entry: ";" would split CMake lists
  string(REGEX MATCHALL "[A-Za-z0-9_.]+ ?{[^}]*} ?[A-Za-z0-9_.]* ?," _map_blocks "${_map_text}")
  set(map_nodes "")
  set(_map_seen "")
  foreach(_block IN LISTS _map_blocks)
    if(NOT _block MATCHES "^([A-Za-z0-9_.]+) ?{([^}]*)} ?([A-Za-z0-9_.]*) ?,$")
      message(FATAL_ERROR "cannot read version node '${_block}' in ${map}")
    endif()
    set(_node "${CMAKE_MATCH_1}")
    set(_body "${CMAKE_MATCH_2}")
    set(map_parent_${_node} "${CMAKE_MATCH_3}")
    list(APPEND map_nodes "${_node}")
    string(REGEX REPLACE "local:.*$" "" _body "${_body}")  # local: * hides everything else
    string(REPLACE "global:" "" _body "${_body}")
    string(REGEX MATCHALL "[^ ,]+" _names "${_body}")
    set(map_symbols_${_node} "")
    foreach(_name IN LISTS _names)
      if(_name MATCHES "[*?\\[]")
        message(FATAL_ERROR "${map}: node ${_node} exports the pattern '${_name}'; list each function by name")
      endif()
      if(_name IN_LIST _map_seen)
        message(FATAL_ERROR "${map}: ${_name} is listed in more than one node")
      endif()
      list(APPEND _map_seen "${_name}")
      list(APPEND map_symbols_${_node} "${_name}")
    endforeach()
  endforeach()
  if(map_nodes STREQUAL "")
    message(FATAL_ERROR "no version nodes found in ${map}")
  endif()
endmacro()

# instinfer_symbol_node(<name> <out_var>): the map node listing <name> ("" if none); needs
# instinfer_read_map first.
function(instinfer_symbol_node name out_var)
  set(found "")
  foreach(node IN LISTS map_nodes)
    if(name IN_LIST map_symbols_${node})
      set(found "${node}")
    endif()
  endforeach()
  set(${out_var} "${found}" PARENT_SCOPE)
endfunction()
